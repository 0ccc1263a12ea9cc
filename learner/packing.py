"""Pack variable-length sequences into micro-batches under a token budget (varlen, no padding).

A micro-batch is one row `input_ids [1, T]` plus `cu_seqlens [n+1]` (int32, rising from 0 to T):
the model attends within [cu[i], cu[i+1]) only. Per-token tensors are flat [T] and indexed by
the packed position of the token they describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) at every packed position t, [T] fp32; position 0 of the row gets 0.
    The first token of each packed sequence gets a meaningless value (its "context" is the
    previous sequence): it is never a loss token, which the caller checks."""
    logits, ids = logits[0, :-1].float(), input_ids[0, 1:]
    lp = -F.cross_entropy(logits, ids, reduction="none")
    return F.pad(lp, (1, 0))
