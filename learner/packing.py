"""Pack variable-length sequences into micro-batches under a token budget (varlen, no padding).

A micro-batch is one row `input_ids [1, T]` plus `cu_seqlens [n+1]` (int32, rising from 0 to T):
the model attends within [cu[i], cu[i+1]) only. Per-token tensors are flat [T] and indexed by
the packed position of the token they describe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 logits held at once by chunked_token_logprobs: rows per chunk = this / vocabulary size
# (32k vocab: 2,048 rows, 256 MiB; 157k vocab: 427 rows)
LOGIT_CHUNK_ELEMENTS = 64 << 20


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, T] long
    cu_seqlens: torch.Tensor  # [n+1] int32
    index: list[int]  # which input sequences, in packed order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def plan_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of sequence indices, each bin's total length <= budget.
    Deterministic: ties keep input order, and bins are returned in creation order."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sequence {i} is empty")
        if n > budget:
            raise ValueError(
                f"sequence {i} has {n} tokens, more than learner.micro_batch_tokens={budget}: "
                "raise the budget or cap rollout.max_episode_tokens"
            )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def pack(sequences: Sequence[Sequence[int]], index: list[int]) -> Packed:
    ids = [t for i in index for t in sequences[i]]
    lens = torch.tensor([len(sequences[i]) for i in index])
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return Packed(torch.tensor(ids, dtype=torch.long)[None], cu, list(index))


def flat(values: Sequence[Sequence], index: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate per-sequence lists in packed order into one flat [T] tensor."""
    return torch.tensor([v for i in index for v in values[i]], dtype=dtype)


def flat_rows(rows: Sequence[torch.Tensor], index: list[int]) -> torch.Tensor:
    """Concatenate per-sequence tensors (leading dim = tokens, e.g. routes [n, layers, top_k]) in
    packed order: row t describes packed token t."""
    return torch.cat([rows[i] for i in index])


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) at every packed position t, [T] fp32; position 0 of the row gets 0.
    The first token of each packed sequence gets a meaningless value (its "context" is the
    previous sequence): it is never a loss token, which the caller checks."""
    logits, ids = logits[0, :-1].float(), input_ids[0, 1:]
    lp = -F.cross_entropy(logits, ids, reduction="none")
    return F.pad(lp, (1, 0))


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, target: torch.Tensor,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(h).float()
    entropy = None
    if with_entropy:
        with torch.no_grad():  # H = lse - sum p * logit, a statistic: no graph
            entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    # the same per-row arithmetic as token_logprobs, so chunking changes no bit of a row
    return -F.cross_entropy(logits, target, reduction="none"), entropy


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    chunk_rows: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` from the final hidden states [1, T, D] and the LM head (`head`: hidden rows
    -> logits [rows, V]), a chunk of rows at a time: fp32 logits exist for one chunk only, in the
    forward and again in the backward, which recomputes them (one more LM-head GEMM) instead of
    keeping [T, V] fp32 logits alive. Returns (logprobs [T], entropy [T] or None; entropy is of
    the predicting position's distribution, detached, 0 at position 0)."""
    h, target = hidden[0, :-1], input_ids[0, 1:]
    T = h.shape[0]
    if chunk_rows is None:
        with torch.no_grad():
            V = head(h[:1]).shape[-1]
        chunk_rows = max(1, LOGIT_CHUNK_ELEMENTS // V)
    lps, ents = [], []
    for a in range(0, T, chunk_rows):
        args = (head, h[a : a + chunk_rows], target[a : a + chunk_rows], with_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    lp = F.pad(torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32), (1, 0))
    entropy = F.pad(torch.cat(ents) if ents else lp.new_zeros(0), (1, 0)) if with_entropy else None
    return lp, entropy
