"""Routed experts of a sparse MoE layer (Ring-2.6: SiLU-gated MLP experts, top-k per token).

moe_ffn(x [N,D], ids [N,k], weights [N,k], w_gate [E,I,D], w_up [E,I,D], w_down [E,D,I]) -> [N,D]:

    out_t = sum_j weights[t, j] * down_e( silu(gate_e(x_t)) * up_e(x_t) ),   e = ids[t, j]

Differentiable in x, weights and the expert weights. Nothing reads a device value back to the host:
rows are sorted by expert on the device and the Triton grouped GEMM (grouped.py) sizes its grid by
an upper bound. The torch path (reference.py, moe_sorted) serves CPU tensors; moe_loop is the oracle.
Triton on CUDA, torch otherwise; KPOP_KERNELS overrides (kernels/_dispatch.py).
"""
from __future__ import annotations

from torch import Tensor

from kernels._dispatch import backend, check
from kernels.moe.reference import moe_loop, moe_sorted, sort_by_expert

__all__ = ["moe_ffn", "moe_loop", "moe_sorted", "sort_by_expert"]


def moe_ffn(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """See the module docstring. `ids` must lie in [0, E): they are not range-checked here (that
    would be a host sync); MoE callers that take ids from outside check them first."""
    check(x.dim() == 2, f"moe_ffn: x must be [N, D], got {tuple(x.shape)}")
    N, D = x.shape
    check(w_gate.dim() == 3 and w_gate.shape[2] == D, f"moe_ffn: w_gate must be [E, I, D={D}], got {tuple(w_gate.shape)}")
    E, I, _ = w_gate.shape
    check(w_up.shape == w_gate.shape, f"moe_ffn: w_up {tuple(w_up.shape)} must match w_gate {tuple(w_gate.shape)}")
    check(w_down.shape == (E, D, I), f"moe_ffn: w_down must be [E, D, I]={(E, D, I)}, got {tuple(w_down.shape)}")
    check(ids.dim() == 2 and ids.shape[0] == N and not ids.is_floating_point(),
          f"moe_ffn: ids must be an integer [N={N}, k] tensor, got {ids.dtype} {tuple(ids.shape)}")
    check(weights.shape == ids.shape and weights.is_floating_point(),
          f"moe_ffn: weights must be a float tensor shaped like ids {tuple(ids.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    check(x.is_floating_point() and w_gate.dtype == x.dtype and w_up.dtype == x.dtype and w_down.dtype == x.dtype,
          f"moe_ffn: x and the expert weights need one float dtype, got {x.dtype}/{w_gate.dtype}/{w_up.dtype}/{w_down.dtype}")
    ids = ids.long()
    if backend(x, ids, weights, w_gate, w_up, w_down) == "triton":
        from kernels.moe.grouped import moe_grouped_triton
        return moe_grouped_triton(x, ids, weights, w_gate, w_up, w_down)
    return moe_sorted(x, ids, weights, w_gate, w_up, w_down)
