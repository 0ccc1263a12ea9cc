"""Routed experts of a sparse MoE layer (Ring-2.6: SiLU-gated MLP experts, top-k per token).

moe_ffn(x [N,D], ids [N,k], weights [N,k], w_gate [E,I,D], w_up [E,I,D], w_down [E,D,I]) -> [N,D]:

    out_t = sum_j weights[t, j] * down_e( silu(gate_e(x_t)) * up_e(x_t) ),   e = ids[t, j]

Differentiable in x, weights and the expert weights. Nothing reads a device value back to the host:
rows are sorted by expert on the device (sort.py: one counting-sort launch at decode sizes, torch's
radix sort for training batches, the same result) and the Triton grouped GEMM (grouped.py) sizes its
grid by an upper bound. The torch path (reference.py, moe_sorted) serves CPU tensors; moe_loop is the oracle.
Triton on CUDA, torch otherwise; KPOP_KERNELS overrides (kernels/_dispatch.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels._dispatch import backend
from kernels.moe.reference import moe_loop, moe_sorted, sort_by_expert

__all__ = ["moe_ffn", "moe_loop", "moe_sorted", "sort_by_expert"]


Weights = Tensor | Sequence[Tensor]


def moe_ffn(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Weights, w_up: Weights, w_down: Weights) -> Tensor:
    """See the module docstring. The expert weights are stacked tensors or sequences of E per-expert
    matrices (stacked here only for the Triton path, which needs one tensor each; the torch path
    indexes them as they are, no copy). `ids` must lie in [0, E): they are not range-checked here
    (that would be a host sync); MoE callers that take ids from outside check them first."""
    # `if not ...: raise` rather than check(cond, f"..."): the messages are formatted only on
    # failure (this runs per MoE layer per decode step, where microseconds show)
    if x.dim() != 2:
        raise ValueError(f"moe_ffn: x must be [N, D], got {tuple(x.shape)}")
    N, D = x.shape
    E = len(w_gate)
    if not (E > 0 and len(w_up) == E and len(w_down) == E):
        raise ValueError(f"moe_ffn: w_gate, w_up, w_down must hold one matrix per expert, got {len(w_gate)}/{len(w_up)}/{len(w_down)}")
    g, u, d = w_gate[0], w_up[0], w_down[0]  # per-expert shapes (the torch path checks the rest as it multiplies)
    if not (g.dim() == 2 and g.shape[1] == D):
        raise ValueError(f"moe_ffn: w_gate must be [E, I, D={D}], got [{E}, {', '.join(map(str, g.shape))}]")
    I = g.shape[0]
    if u.shape != g.shape:
        raise ValueError(f"moe_ffn: w_up [{E}, {', '.join(map(str, u.shape))}] must match w_gate [{E}, {I}, {D}]")
    if d.shape != (D, I):
        raise ValueError(f"moe_ffn: w_down must be [E, D, I]={(E, D, I)}, got [{E}, {', '.join(map(str, d.shape))}]")
    if not (ids.dim() == 2 and ids.shape[0] == N and not ids.is_floating_point()):
        raise ValueError(f"moe_ffn: ids must be an integer [N={N}, k] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if not (weights.shape == ids.shape and weights.is_floating_point()):
        raise ValueError(f"moe_ffn: weights must be a float tensor shaped like ids {tuple(ids.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    if not (x.is_floating_point() and g.dtype == x.dtype and u.dtype == x.dtype and d.dtype == x.dtype):
        raise ValueError(f"moe_ffn: x and the expert weights need one float dtype, got {x.dtype}/{g.dtype}/{u.dtype}/{d.dtype}")
    if backend(x, ids, weights, g) == "triton":
        from kernels.moe.grouped import moe_grouped_triton
        stacked = (w if isinstance(w, Tensor) else torch.stack(list(w)) for w in (w_gate, w_up, w_down))
        return moe_grouped_triton(x, ids.long(), weights, *stacked)
    return moe_sorted(x, ids.long(), weights, w_gate, w_up, w_down)
