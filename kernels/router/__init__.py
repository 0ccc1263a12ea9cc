"""The MoE router after its GEMM (Ring-2.6: sigmoid scores, an aux-loss-free bias that steers the
choice, group-limited top-k, normalised weights).

route(logits [N, E] fp32, bias [E], n_group, topk_group, k, scaling) -> (ids int64 [N, k], fp32 w [N, k])

    s = sigmoid(logits); the best topk_group of n_group equal groups by the sum of their two best
    s + bias; the k best s + bias inside them, best first; w = s[ids] normalised over the k
    (k > 1) times scaling.

The Triton kernel (select.py: one launch instead of ~14 small kernels) serves inference: CUDA
tensors with autograd off. With autograd on (training: the weights carry the router's gradient)
or on CPU the torch reference (reference.py) runs. Ties between equal scores resolve to the lowest
index in the kernel; torch.topk leaves them unspecified. KPOP_KERNELS overrides the backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend
from kernels.router.reference import expert_weights, group_limited_topk, route_ref

__all__ = ["expert_weights", "group_limited_topk", "route", "route_ref"]


def route(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int,
          scaling: float) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [N, E], got {tuple(logits.shape)}")
    E = logits.shape[1]
    if bias.shape != (E,):
        raise ValueError(f"route: bias must be [E={E}], got {tuple(bias.shape)}")
    if not (n_group > 0 and E % n_group == 0 and E // n_group >= 2):
        raise ValueError(f"route: {E} experts must split into n_group={n_group} groups of at least 2")
    if not (1 <= topk_group <= n_group and 1 <= k <= topk_group * (E // n_group)):
        raise ValueError(f"route: need 1 <= topk_group={topk_group} <= n_group={n_group} and "
                         f"1 <= k={k} <= the {topk_group * (E // n_group)} experts of topk_group groups")
    if torch.is_grad_enabled() or logits.dtype != torch.float32 or backend(logits, bias) == "torch":
        return route_ref(logits, bias, n_group, topk_group, k, scaling)
    from kernels.router.select import route_triton
    return route_triton(logits, bias, n_group, topk_group, k, scaling)
