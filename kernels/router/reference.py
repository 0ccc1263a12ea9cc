"""The MoE router's expert choice and weights in plain torch: training, routing replay, the CPU path
and the Triton kernel's oracle."""
from __future__ import annotations

import torch


def group_limited_topk(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Group-limited top-k over the biased scores [N, E]: the best `topk_group` of `n_group` equal
    groups by the sum of their top-2, then the top `k` experts inside them -> int64 [N, k], best first.
    The bias only steers the choice (no gradient flows through it)."""
    biased = scores.detach() + bias.float()
    n, e = biased.shape
    grouped = biased.view(n, n_group, e // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    keep = group_score.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, e)
    return masked.topk(k, dim=-1).indices


def expert_weights(scores: torch.Tensor, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """The unbiased scores of the chosen experts, normalised over them (k > 1), times `scaling`."""
    w = scores.gather(1, idx)
    if idx.shape[1] > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


def route_ref(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(logits)
    idx = group_limited_topk(scores, bias, n_group, topk_group, k)
    return idx, expert_weights(scores, idx, scaling)
