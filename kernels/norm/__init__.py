"""RMSNorm (Ring-2.6: every pre-norm, the q/k norms, the MLA latent norms, Lightning's group norm).

rms_norm(x [..., D], weight [D], eps, groups=1) -> [..., D]: the norm over the last dim, or over
`groups` equal slices of it with one weight over the whole dim. Output dtype: x's promoted with the
weight's (as `weight * normed` promotes).

The Triton kernel (rmsnorm.py, one launch instead of ~7 eager kernels) is forward-only and serves
inference: CUDA tensors with autograd off. With autograd on (training) or on CPU the torch
reference (reference.py) runs. Both compute in the same order; the kernel's sum of squares is
summed in another order, so a result may differ from the reference by one rounding of the output.
KPOP_KERNELS overrides the choice of backend (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend
from kernels.norm.reference import rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1) -> Tensor:
    D = x.shape[-1]
    if not (weight.dim() == 1 and weight.shape[0] == D):
        raise ValueError(f"rms_norm: weight must be [D={D}], got {tuple(weight.shape)}")
    if not (groups > 0 and D % groups == 0):
        raise ValueError(f"rms_norm: groups={groups} must divide the last dim {D}")
    if (
        torch.is_grad_enabled()  # the kernel has no backward: training keeps the reference
        or x.dtype not in _KERNEL_DTYPES
        or weight.dtype not in _KERNEL_DTYPES
        or backend(x, weight) == "torch"
    ):
        return rms_norm_ref(x, weight, eps, groups)
    from kernels.norm.rmsnorm import rms_norm_triton
    return rms_norm_triton(x, weight, eps, groups)
