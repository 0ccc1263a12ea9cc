"""RoPE in plain torch: the model's training path, the CPU path and the Triton kernel's oracle."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of x `[..., H, D]`; cos/sin `[..., rot]` (no head dim).

    `interleaved` (MLA): pairs are (0,1), (2,3), ... in the weights; they are de-interleaved first,
    as the HF reference does, so q and k come out in the same (NeoX) order. cos/sin are rounded to
    x's dtype first, and every product and the sum are rounded to it (the eager arithmetic).
    """
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        xr = xr.unflatten(-1, (rot // 2, 2)).transpose(-1, -2).flatten(-2)
    xr = xr * cos + rotate_half(xr) * sin
    return torch.cat([xr, xp], dim=-1) if xp.shape[-1] else xr
