"""A linear layer with fp32 output (Ring-2.6's LM head is computed in fp32 in training and
inference alike, so that rollout and learner logits match).

linear_fp32(x [..., K], w [N, K]) -> fp32 [..., N] = x.float() @ w.float()^T

For bf16/fp16 x on CUDA with autograd off (inference: the rollout engine, no-grad scoring) and w
of x's dtype, or fp32 w with bf16 x (the fp32 head of a bf16 model), a Triton tensor-core GEMM
(gemm.py) computes it: every product it forms is exact in fp32 (an fp32 w is split into three bf16
pieces), so only the summation order differs from the fp32 GEMM, which is several times slower.
With autograd on (training), fp32 x or on CPU the torch reference (reference.py) runs.
KPOP_KERNELS overrides the choice of backend (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend
from kernels.linear.reference import linear_fp32_ref

__all__ = ["linear_fp32", "linear_fp32_ref"]


def linear_fp32(x: Tensor, w: Tensor) -> Tensor:
    if not (w.dim() == 2 and x.dim() >= 1 and x.shape[-1] == w.shape[1]):
        raise ValueError(f"linear_fp32: x [..., K] and w [N, K] must share K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if (
        torch.is_grad_enabled()  # the kernel has no backward: training keeps the reference
        or not (w.dtype == x.dtype in (torch.bfloat16, torch.float16)
                or (x.dtype == torch.bfloat16 and w.dtype == torch.float32))
        or backend(x, w) == "torch"
    ):
        return linear_fp32_ref(x, w)
    from kernels.linear.gemm import linear_fp32_triton
    return linear_fp32_triton(x, w)
