"""Pure-torch MoE expert computation: the loop oracle and the sorted CPU path.

Both compute, for routed rows (token t, slot j) with expert e = ids[t, j] and weight w = weights[t, j],

    out_t = sum_j  w * down_e( silu(gate_e(x_t)) * up_e(x_t) )

with each expert's output rounded to x.dtype before the fp32 weighted sum (as the HF reference does).
Weights are stacked per expert: w_gate, w_up [E, I, D], w_down [E, D, I] (HF `nn.Linear` layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moe_loop(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The test oracle: one expert at a time over the tokens routed to it (a host sync per expert)."""
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for an fp64 oracle
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in ids.unique().tolist():
        tok, k = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        h = F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e])
        y.index_add_(0, tok, F.linear(h, w_down[e]).to(acc) * weights[tok, k, None])
    return y.to(x.dtype)


def sort_by_expert(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(order [N*k], counts [E] int32): `order` lists the flat routed rows (t*k + j) grouped by
    expert, in token order inside each group; `counts` = rows per expert. No host sync:
    `bincount` would read the maximum back to size its output."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts


def sum_slots(y: Tensor) -> Tensor:
    """fp32 [N, D] = sum over j of y [N, K, D], in the order of torch's CUDA reduction of
    `y.sum(1, dtype=torch.float32)` for K < 16 (one thread per output, four accumulators: slot j
    goes to accumulator j % 4, each starting at 0; then ((a0 + a1) + a2) + a3). The Triton
    combine (grouped._sum_slots) adds in this order, so it gives torch's bits; on CPU torch's own
    sum may add in another order."""
    acc = [torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32, device=y.device) for _ in range(4)]
    for j in range(y.shape[1]):
        acc[j % 4] = acc[j % 4] + y[:, j].float()
    return ((acc[0] + acc[1]) + acc[2]) + acc[3]


def moe_sorted(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The CPU path: rows sorted by expert once, each expert's slice through three matmuls, one
    weighted sum back to token order. Differentiable by autograd."""
    N, k = ids.shape
    order, counts = sort_by_expert(ids, len(w_gate))
    xs = x[order // k]
    outs = []
    # the counts are read once (on CPU that is free); the loop skips empty experts
    for e, rows in enumerate(torch.split(xs, counts.tolist())):
        if rows.shape[0]:
            h = F.silu(F.linear(rows, w_gate[e])) * F.linear(rows, w_up[e])
            outs.append(F.linear(h, w_down[e]))
    ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
    y = torch.empty_like(ys).index_copy(0, order, ys)  # back to (token, slot) order
    acc = torch.promote_types(x.dtype, torch.float32)
    out = (y.view(N, k, -1).to(acc) * weights.unsqueeze(-1)).sum(1)
    return out.to(x.dtype)
