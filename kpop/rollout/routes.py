"""Assembling an engine's routing-replay record into a request's `Routes`.

An engine records, for every pass of a request's tokens through the model (prefill chunk, decode
step, re-prefill after a weight update or a preemption), `(first position, ids [tokens, MoE
layers, top_k])`. A token keeps the route of its last pass: the one the tokens sampled after it saw.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kpop.trajectory import Routes


def routes_from_passes(passes: Sequence[tuple[int, torch.Tensor]], num_tokens: int, num_experts: int) -> Routes | None:
    """Routes of a request's `num_tokens` context tokens (prompt + sampled) from its passes, oldest
    first; tokens no pass fed (the last sampled one) have none. Rows beyond the context are
    dropped: an engine that schedules ahead may have fed a token past the one it stopped at."""
    if not passes:
        return None
    # back-to-back passes (each decode step's one row after the last) are copied as one block: a
    # request of a thousand decode steps costs a few copies, not a thousand (in order, so the
    # last pass over a token still wins)
    blocks: list[tuple[int, list[torch.Tensor]]] = []
    end = -1
    for start, chunk in passes:
        if start == end:
            blocks[-1][1].append(chunk)
        else:
            blocks.append((start, [chunk]))
        end = start + len(chunk)
    ids = torch.zeros(num_tokens, *passes[0][1].shape[1:], dtype=torch.int32)
    known = torch.zeros(num_tokens, dtype=torch.bool)
    for start, chunks in blocks:
        chunk = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        end = min(start + len(chunk), num_tokens)
        if end > start:
            ids[start:end] = chunk[: end - start].to(torch.int32)
            known[start:end] = True
    return Routes.from_ids(ids, num_experts, known)
