"""Group-relative advantages, dynamic filtering and the Evo-CoT length reward.

Every function takes one flat batch of N samples: `rewards [N]` (float) and `groups [N]`
(long, samples of one prompt share an id; ids need not be contiguous or sorted). Use
`group_index` to turn arbitrary hashable group ids (e.g. strings) into that tensor.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def group_index(ids: Sequence[Hashable]) -> torch.Tensor:
    """["a", "b", "a"] -> tensor([0, 1, 0]): dense group indices in order of first appearance."""
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in ids], dtype=torch.long)


def _check(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must both be [N], got {tuple(rewards.shape)} and {tuple(groups.shape)}")
    if groups.dtype != torch.long:
        raise ValueError(f"groups must be a long tensor (use group_index), got {groups.dtype}")
    _, dense = torch.unique(groups, return_inverse=True)
    return rewards.float(), dense, int(dense.max()) + 1 if dense.numel() else 0


def _group_sum(x: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, dense, x)


def grpo_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps), std the unbiased group std (Dr.GRPO: normalize_std=False
    keeps only the mean baseline). A group of one sample gets advantage 0."""
    r, dense, n = _check(rewards, groups)
    count = _group_sum(torch.ones_like(r), dense, n)
    mean = _group_sum(r, dense, n) / count
    centred = r - mean[dense]
    if not normalize_std:
        return centred
    var = _group_sum(centred**2, dense, n) / (count - 1).clamp(min=1)
    return centred / (var.sqrt()[dense] + eps)


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j in g, j != i} r_j. Needs groups of >= 2."""
    r, dense, n = _check(rewards, groups)
    count = _group_sum(torch.ones_like(r), dense, n)
    if bool((count < 2).any()):
        raise ValueError(f"RLOO needs every group to hold >= 2 samples, got group sizes {count.long().tolist()}")
    total = _group_sum(r, dense, n)[dense]
    return r - (total - r) / (count[dense] - 1)


def varied_groups(rewards: torch.Tensor, groups: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Dynamic filtering (DAPO): bool [N], False for every sample of a group whose rewards all agree,
    since such a group has zero advantage and only dilutes the batch."""
    r, dense, n = _check(rewards, groups)
    hi = torch.full((n,), -torch.inf).scatter_reduce(0, dense, r, "amax")
    lo = torch.full((n,), torch.inf).scatter_reduce(0, dense, r, "amin")
    return (hi - lo > tol)[dense]


def length_rewards(lengths: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Evo-CoT length reward over each group: p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9);
    a correct sample gets p(l), a wrong one min(p(l), 0) (short wrong answers earn nothing)."""
    length, dense, n = _check(lengths.float(), groups)
    if correct.shape != length.shape:
        raise ValueError(f"correct must be [N] like lengths, got {tuple(correct.shape)}")
    lmax = torch.full((n,), -torch.inf).scatter_reduce(0, dense, length, "amax")[dense]
    lmin = torch.full((n,), torch.inf).scatter_reduce(0, dense, length, "amin")[dense]
    p = 0.5 - (length - lmin) / (lmax - lmin + 1e-9)
    return torch.where(correct.bool(), p, p.clamp(max=0.0))
