"""Triton RMSNorm forward (inference): one kernel per call, the torch reference's arithmetic in order.

A "unit" is one normalised slice: a row, or one of a row's `groups` slices (GroupRMSNorm). Each
program normalises BLOCK_R units of G elements:

    ss   = sum(xf * xf)                  fp32, tree order (the one difference from torch's reduction)
    rstd = rsqrt(ss * (1 / G) + eps)     torch's CUDA mean multiplies by 1/G; no FMA (fusion is off)
    y    = round_x(xf * rstd)            to x's dtype, round-to-nearest-even
    out  = round_out(y * w)              in fp32, rounded to the output dtype (torch's promotion)

Rows of any leading shape: the caller passes x as [A, B, D] with strides (row r is (r // B, r % B)),
so the strided q/k views of a fused projection are read in place. Nothing syncs with the host and
the output is the only allocation (CUDA-graph capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round(v, DT: tl.constexpr):
    """fp32 -> the nearest value of dtype DT (ties to even), kept in fp32. bf16 by hand: Triton's
    CPU interpreter truncates on a bf16 cast, and a value that is already bf16 casts exactly."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, r.to(tl.float32, bitcast=True))  # NaN stays NaN
    elif DT == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _rms_norm_fwd(
    x, w, out, units, B, stride_a, stride_b, eps, inv_g,
    G: tl.constexpr, GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    X_DT: tl.constexpr, OUT_DT: tl.constexpr,
):
    u = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_G)
    row = u // GROUPS
    g = u % GROUPS
    base = (row // B).to(tl.int64) * stride_a + (row % B).to(tl.int64) * stride_b + g * G
    mask = (u < units)[:, None] & (j < G)[None, :]
    xf = tl.load(x + base[:, None] + j[None, :], mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(xf * xf, 1)
    rstd = tl.math.rsqrt(ss * inv_g + eps)
    y = _round(xf * rstd[:, None], X_DT)
    wf = tl.load(w + g[:, None] * G + j[None, :], mask=mask, other=0.0).to(tl.float32)
    o = _round(y * wf, OUT_DT)
    tl.store(out + u[:, None].to(tl.int64) * G + j[None, :], o.to(out.dtype.element_ty), mask=mask)


def launch_config(G: int) -> tuple[int, int, int]:
    """(BLOCK_R units, BLOCK_G, warps) for units of G elements: ~2k elements a program (narrow q/k
    norms batch rows), a whole unit per program however wide (8192 for Ring-2.6-1T: 16 warps)."""
    BLOCK_G = triton.next_power_of_2(G)
    BLOCK_R = max(1, min(64, 2048 // BLOCK_G))
    tile = BLOCK_R * BLOCK_G
    return BLOCK_R, BLOCK_G, 4 if tile <= 4096 else 8 if tile <= 16384 else 16


def _rows_3d(x: Tensor) -> Tensor:
    """x as [A, B, D] (a view when the leading dims allow, e.g. a chunk of a fused projection)."""
    D = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, D)
    if x.dim() == 2:
        return x.unsqueeze(0)
    try:
        return x.view(-1, x.shape[-2], D)
    except RuntimeError:  # leading dims that do not merge: one copy
        return x.reshape(1, -1, D)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, groups: int = 1) -> Tensor:
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    x3 = _rows_3d(x)
    units = x3.shape[0] * x3.shape[1] * groups
    if units == 0:
        return out
    G = D // groups
    BLOCK_R, BLOCK_G, warps = launch_config(G)
    _rms_norm_fwd[(triton.cdiv(units, BLOCK_R),)](
        x3, weight.contiguous(), out, units, x3.shape[1], x3.stride(0), x3.stride(1), eps, 1.0 / G,
        G=G, GROUPS=groups, BLOCK_R=BLOCK_R, BLOCK_G=BLOCK_G, X_DT=_TL[x.dtype], OUT_DT=_TL[out.dtype],
        num_warps=warps, enable_fp_fusion=False,
    )
    return out
