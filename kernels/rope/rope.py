"""Triton RoPE forward (inference): one kernel per call, the torch reference's arithmetic in order.

A "unit" is one head of one token. Each program rotates BLOCK_U units; with x1/x2 the two halves
of the rotated dims (the even/odd elements when interleaved: the de-interleave is only an index)
and c/s the cos/sin row of the unit's token, each value rounded to x's dtype (round-to-nearest-even):

    c, s = round_x(cos), round_x(sin)                     the reference's cast of the tables
    out1 = round_x(round_x(x1 * c1) + round_x(-x2 * s1))  x * cos + rotate_half(x) * sin
    out2 = round_x(round_x(x2 * c2) + round_x( x1 * s2))
    out[rot:] = x[rot:]                                   the pass-through dims, copied

Products of two 16-bit values are exact in fp32, so each round_x is the one rounding torch's
16-bit op makes; fp32 runs the same IEEE ops (no FMA: fusion is off). The result is bit-identical.

The leading dims of x (and of cos/sin, broadcast against them) are merged to at most two, [A, B],
with their strides, so the strided q/k views of a fused projection are read in place. Nothing syncs
with the host and the output is the only allocation (CUDA-graph capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.norm.rmsnorm import _TL, _round


@triton.jit
def _rope_fwd(
    x, cos, sin, out, units, H, B,
    sx_a, sx_b, sx_h, sx_d, sc_a, sc_b, sc_d, ss_a, ss_b, ss_d,
    HALF: tl.constexpr, P: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_P: tl.constexpr, X_DT: tl.constexpr,
):
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    t = u // H
    h = (u % H).to(tl.int64)
    a = (t // B).to(tl.int64)
    b = (t % B).to(tl.int64)
    xb = (a * sx_a + b * sx_b + h * sx_h)[:, None]
    cb = (a * sc_a + b * sc_b)[:, None]
    sb = (a * ss_a + b * ss_b)[:, None]
    ob = u[:, None].to(tl.int64) * (2 * HALF + P)
    live = (u < units)[:, None]

    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = live & (i < HALF)
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    x1 = tl.load(x + xb + i1 * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + xb + i2 * sx_d, mask=mask, other=0.0).to(tl.float32)
    c1 = _round(tl.load(cos + cb + i * sc_d, mask=mask, other=0.0).to(tl.float32), X_DT)
    c2 = _round(tl.load(cos + cb + (i + HALF) * sc_d, mask=mask, other=0.0).to(tl.float32), X_DT)
    s1 = _round(tl.load(sin + sb + i * ss_d, mask=mask, other=0.0).to(tl.float32), X_DT)
    s2 = _round(tl.load(sin + sb + (i + HALF) * ss_d, mask=mask, other=0.0).to(tl.float32), X_DT)
    o1 = _round(_round(x1 * c1, X_DT) + _round(-x2 * s1, X_DT), X_DT)
    o2 = _round(_round(x2 * c2, X_DT) + _round(x1 * s2, X_DT), X_DT)
    # every value is on x's grid already, so this cast is exact (even where the interpreter truncates)
    tl.store(out + ob + i, o1.to(out.dtype.element_ty), mask=mask)
    tl.store(out + ob + HALF + i, o2.to(out.dtype.element_ty), mask=mask)

    if P > 0:
        j = tl.arange(0, BLOCK_P)[None, :]
        pmask = live & (j < P)
        xp = tl.load(x + xb + (2 * HALF + j) * sx_d, mask=pmask)
        tl.store(out + ob + 2 * HALF + j, xp, mask=pmask)


def launch_config(rot: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_U units, BLOCK_HALF, BLOCK_P, warps): ~2k output elements a program (decode has few
    tokens of narrow heads: many heads a program, yet enough programs to spread over the SMs)."""
    BLOCK_HALF = triton.next_power_of_2(max(rot // 2, 1))
    BLOCK_P = triton.next_power_of_2(D - rot) if D > rot else 1
    BLOCK_U = max(1, min(64, 2048 // triton.next_power_of_2(2 * BLOCK_HALF + (BLOCK_P if D > rot else 0))))
    return BLOCK_U, BLOCK_HALF, BLOCK_P, 4


def _merge_leading(shape: tuple[int, ...], *strides: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The leading dims as few (size, *strides) dims as index the same elements in every tensor:
    size-1 dims dropped, neighbours merged where each tensor steps through them as through one."""
    dims = [(n, *(s[k] for s in strides)) for k, n in enumerate(shape) if n != 1]
    merged: list[tuple[int, ...]] = []
    for d in dims:
        if merged and all(p == q * d[0] for p, q in zip(merged[-1][1:], d[1:])):
            merged[-1] = (merged[-1][0] * d[0], *d[1:])
        else:
            merged.append(d)
    return merged


def apply_rope_triton(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """The caller has checked the shapes: x [..., H, D], cos/sin broadcast to x.shape[:-2] + (rot,)."""
    H, D, rot = x.shape[-2], x.shape[-1], cos.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lead = x.shape[:-2]
    cos, sin = cos.expand(*lead, rot), sin.expand(*lead, rot)
    dims = _merge_leading(lead, x.stride()[:-2], cos.stride()[:-1], sin.stride()[:-1])
    if len(dims) > 2:  # leading dims that no two strides can index (e.g. a permuted batch): one copy
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        dims = _merge_leading(lead, x.stride()[:-2], cos.stride()[:-1], sin.stride()[:-1])
    dims = [(1, 0, 0, 0)] * (2 - len(dims)) + dims
    (A, sx_a, sc_a, ss_a), (B, sx_b, sc_b, ss_b) = dims
    units = A * B * H
    if units == 0:
        return out
    BLOCK_U, BLOCK_HALF, BLOCK_P, warps = launch_config(rot, D)
    _rope_fwd[(triton.cdiv(units, BLOCK_U),)](
        x, cos, sin, out, units, H, B,
        sx_a, sx_b, x.stride(-2), x.stride(-1), sc_a, sc_b, cos.stride(-1), ss_a, ss_b, sin.stride(-1),
        HALF=rot // 2, P=D - rot, INTERLEAVED=interleaved,
        BLOCK_U=BLOCK_U, BLOCK_HALF=BLOCK_HALF, BLOCK_P=BLOCK_P, X_DT=_TL[x.dtype],
        num_warps=warps, enable_fp_fusion=False,
    )
    return out
