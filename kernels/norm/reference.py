"""RMSNorm in plain torch: the model's training path, the CPU path and the Triton kernel's oracle."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """RMSNorm over the last dim, or over `groups` equal slices of it with one weight over the
    whole dim. Statistics in fp32 whatever the activation dtype (as the HF reference does); the
    normalised value is rounded to x's dtype before the weight multiplies it."""
    xf = x.float()
    if groups > 1:
        xf = xf.unflatten(-1, (groups, -1))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype).reshape(x.shape)
