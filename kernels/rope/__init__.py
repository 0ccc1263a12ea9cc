"""Rotary position embeddings on q/k heads (Ring-2.6: Lightning's partial rotary, MLA's rope dims).

apply_rope(x [..., H, D], cos [..., rot], sin [..., rot], interleaved=False) -> [..., H, D]: the first
rot dims of every head rotated in the NeoX layout (halves), the other D - rot passed through.
cos/sin carry no head dim and broadcast against x's leading dims. `interleaved` (MLA's weights
pair dims (0,1), (2,3), ...): de-interleaved first, so the output is in NeoX order. Output dtype: x's.

The Triton kernel (rope.py, one launch instead of ~8 eager kernels) is forward-only and serves
inference: CUDA tensors with autograd off. With autograd on (training) or on CPU the torch
reference (reference.py) runs. The kernel rounds where the reference does and is bit-identical to
it. KPOP_KERNELS overrides the choice of backend (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend
from kernels.rope.reference import apply_rope_ref, rotate_half

__all__ = ["apply_rope", "apply_rope_ref", "rotate_half"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"apply_rope: x must be [..., H, D], got {tuple(x.shape)}")
    if cos.dim() < 1 or cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos and sin must be [..., rot] of one shape, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    D, rot = x.shape[-1], cos.shape[-1]
    if rot % 2 or rot > D:
        raise ValueError(f"apply_rope: the rotated width {rot} must be even and at most the head dim {D}")
    lead = tuple(x.shape[:-2])
    try:
        fits = torch.broadcast_shapes(cos.shape[:-1], lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} do not broadcast to x's leading dims {lead}")
    if (
        torch.is_grad_enabled()  # the kernel has no backward: training keeps the reference
        or x.dtype not in _KERNEL_DTYPES
        or cos.dtype not in _KERNEL_DTYPES
        or sin.dtype not in _KERNEL_DTYPES
        or backend(x, cos, sin) == "torch"
    ):
        return apply_rope_ref(x, cos, sin, interleaved)
    from kernels.rope.rope import apply_rope_triton
    return apply_rope_triton(x, cos, sin, interleaved)
