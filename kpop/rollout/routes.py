"""Assembling an engine's routing-replay record into a request's `Routes`.

An engine records, for every pass of a request's tokens through the model (prefill chunk, decode
step, re-prefill after a weight update or a preemption), `(first position, ids [tokens, MoE
layers, top_k])`. A token keeps the route of its last pass: the one the tokens sampled after it saw.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kpop.trajectory import Routes


def routes_from_passes(passes: Sequence[tuple[int, np.ndarray | torch.Tensor]], num_tokens: int,
                       num_experts: int) -> Routes | None:
    """Routes of a request's `num_tokens` context tokens (prompt + sampled) from its passes, oldest
    first; tokens no pass fed (the last sampled one) have none. Rows beyond the context are
    dropped: an engine that schedules ahead may have fed a token past the one it stopped at.

    In numpy, not torch: an engine finishes a whole batch of requests in one step, and torch's
    intra-op thread pool made each of these small ops cost milliseconds on a busy host (the GPU
    idled while 256 requests were assembled)."""
    if not passes:
        return None
    # back-to-back passes (each decode step's one row after the last) are copied as one block: a
    # request of a thousand decode steps costs a few copies, not a thousand (in order, so the
    # last pass over a token still wins)
    blocks: list[tuple[int, list[np.ndarray]]] = []
    end = -1
    for start, chunk in passes:
        rows = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk
        if start == end:
            blocks[-1][1].append(rows)
        else:
            blocks.append((start, [rows]))
        end = start + len(rows)
    wide = num_experts > 256
    ids = np.zeros((num_tokens, *passes[0][1].shape[1:]), dtype="<u2" if wide else np.uint8)
    known = np.zeros(num_tokens, dtype=np.uint8)
    for start, chunks in blocks:
        chunk = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        end = min(start + len(chunk), num_tokens)
        if end > start:
            chunk = chunk[: end - start]
            if chunk.size and not 0 <= int(chunk.min()) <= int(chunk.max()) < num_experts:
                raise ValueError(f"routes ids must lie in [0, {num_experts})")
            ids[start:end] = chunk
            known[start:end] = 1
    return Routes(shape=ids.shape, dtype="uint16" if wide else "uint8", data=ids.tobytes(), known=known.tobytes())
