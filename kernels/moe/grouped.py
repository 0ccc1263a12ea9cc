"""Triton grouped GEMM for the routed experts (forward and backward), no host sync.

Rows are the routed (token, slot) pairs sorted by expert (sort.expert_layout): expert e owns
rows offsets[e] .. offsets[e+1] of the sorted order. A row-tiled kernel launches an upper bound of
cdiv(M, BM) + E row tiles (each expert has at most one partial tile) times the column blocks;
each program finds its expert from the per-expert counts in a few vector ops (_tile) and tiles
past the last expert exit, so the grid never depends on device values. Tokens are gathered by index inside the loads and results
scattered back by index inside the stores: no permuted copy of x or of the output is made.

    forward   _gate_up_fwd   h = silu(x W_g^T) * (x W_u^T)       (SiLU-and-multiply in the epilogue;
                                                                 saves [g, u] for the backward)
              _down_fwd      y[t, j] = w[t, j] * (h W_d^T)      (stored in (token, slot) order)
              _sum_slots     out[t] = sum_j y[t, j]            (fp32, one rounding; the k slots of a
                                                                 token come from k programs, so the sum
                                                                 cannot be an exact epilogue of _down_fwd)
    backward  _down_bwd_dh   a = dout W_d;  dw = <a, h>;  [dg, du] = silu'/product rule of w a
              _wgrad         dW_d = (w dout)^T h,  [dW_g; dW_u] = [dg, du]^T x   (one kernel, two uses)
              _gate_up_bwd_dx dx[t, j] = dg W_g + du W_u        (summed over j by _sum_slots)

The routing weights' gradient needs no saved expert output: <dout, w-free y> = <dout W_d, h>.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots
from kernels.moe.sort import expert_layout

# (BM rows, BN cols, BK reduction, warps, stages) per kernel for 16-bit inputs; bench/gpu.py sweeps
# them. Shared memory per program at these tiles: stages * (BM*BK + BK*BN [x2 for gate+up]) * 2 B.
# Tuned by `bench/gpu.py --only moe --sweep-moe` on an H100 (bench-2b layer, 65,536 tokens, fwd+bwd
# 43.4 ms at the first guess): wgrad BK 32 / 4 stages -2.9 ms, gate_up_fwd BN 128 -0.9 ms,
# down_bwd_dh 64x64 / 4 warps -0.7 ms; every other alternative was slower or within 0.1 ms.
CFG_16 = {
    "gate_up_fwd": (128, 128, 64, 8, 3),
    "down_fwd": (128, 128, 64, 8, 3),
    "down_bwd_dh": (64, 64, 64, 4, 4),
    "gate_up_bwd_dx": (128, 128, 64, 8, 3),
    "wgrad": (128, 128, 32, 8, 4),
}
# fp32 (the exact-check path) doubles every tile: halve them
CFG_32 = {
    "gate_up_fwd": (64, 32, 32, 4, 2),
    "down_fwd": (64, 64, 32, 4, 2),
    "down_bwd_dh": (64, 32, 32, 4, 2),
    "gate_up_bwd_dx": (64, 64, 32, 4, 2),
    "wgrad": (64, 64, 32, 4, 2),
}


def launch_config(dtype: torch.dtype) -> dict[str, tuple[int, int, int, int, int]]:
    return CFG_32 if dtype == torch.float32 else CFG_16


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _tile(cols, counts, offsets, E: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """(expert, first row, end row, column block) of this program; expert >= E: no work.
    The column blocks of one row tile are neighbouring programs, so they run together and share
    the gathered row tile (and the expert's weights) through L2 instead of re-reading them."""
    nb = tl.cdiv(cols, BN)
    pid = tl.program_id(0) // nb
    o = tl.arange(0, EP)
    cnt = tl.load(counts + o, mask=o < E, other=0)
    tiles = (cnt + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)  # inclusive: tiles of experts 0..e
    e = tl.sum((cum <= pid).to(tl.int32), 0)
    first = tl.sum(tl.where(o < e, tiles, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    start = tl.load(offsets + e_safe) + (pid - first) * BM
    end = tl.load(offsets + e_safe + 1)
    return e, start, end, tl.program_id(0) % nb


@triton.jit
def _gate_up_fwd(
    x, wg, wu, order, counts, offsets, h, gu, D, I,
    TOPK: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SAVE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    e, start, end, pid_n = _tile(I, counts, offsets, E, EP, BM, BN)
    if e >= E:
        return
    rows = start + tl.arange(0, BM)
    m_r = rows < end
    tok = (tl.load(order + rows, mask=m_r, other=0) // TOPK).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    w_base = e.to(tl.int64) * I * D
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        m_k = kk < D
        a = tl.load(x + tok[:, None] * D + kk[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        w_off = w_base + cols[None, :].to(tl.int64) * D + kk[:, None]
        m_w = m_k[:, None] & m_c[None, :]
        acc_g += mm(a, tl.load(wg + w_off, mask=m_w, other=0.0), UPCAST, PREC)
        acc_u += mm(a, tl.load(wu + w_off, mask=m_w, other=0.0), UPCAST, PREC)
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    r64 = rows.to(tl.int64)[:, None]
    m_o = m_r[:, None] & m_c[None, :]
    tl.store(h + r64 * I + cols[None, :], out.to(h.dtype.element_ty), mask=m_o)
    if SAVE:
        tl.store(gu + r64 * (2 * I) + cols[None, :], acc_g.to(gu.dtype.element_ty), mask=m_o)
        tl.store(gu + r64 * (2 * I) + I + cols[None, :], acc_u.to(gu.dtype.element_ty), mask=m_o)


@triton.jit
def _down_fwd(
    h, wd, order, weights, counts, offsets, y, D, I,
    E: tl.constexpr, EP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    e, start, end, pid_n = _tile(D, counts, offsets, E, EP, BM, BN)
    if e >= E:
        return
    rows = start + tl.arange(0, BM)
    m_r = rows < end
    dst = tl.load(order + rows, mask=m_r, other=0).to(tl.int64)  # (token, slot) row
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    w_base = e.to(tl.int64) * D * I
    r64 = rows.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        m_k = kk < I
        a = tl.load(h + r64[:, None] * I + kk[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b = tl.load(wd + w_base + cols[None, :].to(tl.int64) * I + kk[:, None], mask=m_k[:, None] & m_c[None, :], other=0.0)
        acc += mm(a, b, UPCAST, PREC)
    # each expert's output is rounded to the activation dtype before weighting, as the reference does
    out = acc.to(y.dtype.element_ty).to(tl.float32) * tl.load(weights + dst, mask=m_r, other=0.0)[:, None]
    tl.store(y + dst[:, None] * D + cols[None, :], out.to(y.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _down_bwd_dh(
    dout, wd, gu, order, weights, counts, offsets, dgu, dw_part, D, I, NB,
    TOPK: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    e, start, end, pid_n = _tile(I, counts, offsets, E, EP, BM, BN)
    if e >= E:
        return
    rows = start + tl.arange(0, BM)
    m_r = rows < end
    dst = tl.load(order + rows, mask=m_r, other=0).to(tl.int64)
    tok = dst // TOPK
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    w_base = e.to(tl.int64) * D * I
    acc = tl.zeros([BM, BN], dtype=tl.float32)  # a = dout W_d, before the routing weight
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        m_k = kk < D
        a = tl.load(dout + tok[:, None] * D + kk[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b = tl.load(wd + w_base + kk[:, None].to(tl.int64) * I + cols[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0)
        acc += mm(a, b, UPCAST, PREC)
    r64 = rows.to(tl.int64)[:, None]
    m_o = m_r[:, None] & m_c[None, :]
    g = tl.load(gu + r64 * (2 * I) + cols[None, :], mask=m_o, other=0.0).to(tl.float32)
    u = tl.load(gu + r64 * (2 * I) + I + cols[None, :], mask=m_o, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    hh = (silu * u).to(dgu.dtype.element_ty).to(tl.float32)  # h as the forward stored it
    tl.store(dw_part + dst * NB + pid_n, tl.sum(acc * hh, 1), mask=m_r)
    dh = acc * tl.load(weights + dst, mask=m_r, other=0.0)[:, None]
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    tl.store(dgu + r64 * (2 * I) + cols[None, :], dg.to(dgu.dtype.element_ty), mask=m_o)
    tl.store(dgu + r64 * (2 * I) + I + cols[None, :], (dh * silu).to(dgu.dtype.element_ty), mask=m_o)


@triton.jit
def _gate_up_bwd_dx(
    dgu, wg, wu, order, counts, offsets, dx, D, I,
    E: tl.constexpr, EP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    e, start, end, pid_n = _tile(D, counts, offsets, E, EP, BM, BN)
    if e >= E:
        return
    rows = start + tl.arange(0, BM)
    m_r = rows < end
    dst = tl.load(order + rows, mask=m_r, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    w_base = e.to(tl.int64) * I * D
    r64 = rows.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        m_k = kk < I
        m_a = m_r[:, None] & m_k[None, :]
        w_off = w_base + kk[:, None].to(tl.int64) * D + cols[None, :]
        m_w = m_k[:, None] & m_c[None, :]
        a = tl.load(dgu + r64[:, None] * (2 * I) + kk[None, :], mask=m_a, other=0.0)
        acc += mm(a, tl.load(wg + w_off, mask=m_w, other=0.0), UPCAST, PREC)
        a = tl.load(dgu + r64[:, None] * (2 * I) + I + kk[None, :], mask=m_a, other=0.0)
        acc += mm(a, tl.load(wu + w_off, mask=m_w, other=0.0), UPCAST, PREC)
    tl.store(dx + dst[:, None] * D + cols[None, :], acc.to(dx.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _wgrad(
    left, ld_left, left_col0, right, ld_right, order, weights, offsets, dw, P, Q,
    TOPK: tl.constexpr, LEFT_BY_TOKEN: tl.constexpr, SCALE_LEFT: tl.constexpr,
    RIGHT_BY_TOKEN: tl.constexpr, RIGHT_SILU: tl.constexpr, I_SILU,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """dw[e] [P, Q] = sum over expert e's rows r of  L[r, :P]^T R[r, :Q]  (a reduction over rows).

    L[r] = left[row(r), left_col0 :] (row(r) = its token if LEFT_BY_TOKEN else r), times the
    routing weight if SCALE_LEFT; R[r] = right[row(r)], or silu(g) * u read from [g, u] if RIGHT_SILU."""
    e = tl.program_id(2)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    p = tl.program_id(0) * BM + tl.arange(0, BM)
    q = tl.program_id(1) * BN + tl.arange(0, BN)
    m_p = p < P
    m_q = q < Q
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in range(start, end, BK):
        r = r0 + tl.arange(0, BK)
        m_r = r < end
        dst = tl.load(order + r, mask=m_r, other=0).to(tl.int64)
        if LEFT_BY_TOKEN:
            lrow = dst // TOPK
        else:
            lrow = r.to(tl.int64)
        a = tl.load(left + lrow[None, :] * ld_left + left_col0 + p[:, None], mask=m_p[:, None] & m_r[None, :], other=0.0)
        if SCALE_LEFT:
            wv = tl.load(weights + dst, mask=m_r, other=0.0)
            a = (a.to(tl.float32) * wv[None, :]).to(left.dtype.element_ty)
        if RIGHT_BY_TOKEN:
            rrow = dst // TOPK
        else:
            rrow = r.to(tl.int64)
        m_b = m_r[:, None] & m_q[None, :]
        if RIGHT_SILU:
            g = tl.load(right + rrow[:, None] * ld_right + q[None, :], mask=m_b, other=0.0).to(tl.float32)
            u = tl.load(right + rrow[:, None] * ld_right + I_SILU + q[None, :], mask=m_b, other=0.0).to(tl.float32)
            b = (g * tl.sigmoid(g) * u).to(right.dtype.element_ty)
        else:
            b = tl.load(right + rrow[:, None] * ld_right + q[None, :], mask=m_b, other=0.0)
        acc += mm(a, b, UPCAST, PREC)
    base = e.to(tl.int64) * P * Q
    tl.store(dw + base + p[:, None].to(tl.int64) * Q + q[None, :], acc.to(dw.dtype.element_ty), mask=m_p[:, None] & m_q[None, :])


@triton.jit
def _sum_slots(y, out, D, K: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_j y[t, j] in fp32, one rounding to out's dtype, in the order of torch's CUDA
    `y.sum(1, dtype=torch.float32)` (reference.sum_slots): exact against the two kernels it replaces."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    m = cols < D
    a0 = tl.zeros([BD], tl.float32)
    a1 = tl.zeros([BD], tl.float32)
    a2 = tl.zeros([BD], tl.float32)
    a3 = tl.zeros([BD], tl.float32)
    for j in tl.static_range(K):  # j is a constant: each branch below is chosen at compile time
        v = tl.load(y + (t * K + j) * D + cols, mask=m, other=0.0).to(tl.float32)
        if j % 4 == 0:
            a0 += v
        elif j % 4 == 1:
            a1 += v
        elif j % 4 == 2:
            a2 += v
        else:
            a3 += v
    tl.store(out + t * D + cols, (((a0 + a1) + a2) + a3).to(out.dtype.element_ty), mask=m)


SUM_BD = 1024  # columns per program of _sum_slots: 8 bf16 (one 16-byte load) per thread at 4 warps


def sum_slots(y: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, D] in `dtype` = the fp32 sum over the K slots of y [N, K, D], rounded once: torch's
    `y.sum(1, dtype=torch.float32).to(dtype)` bit for bit, in one launch instead of two. Torch's
    CUDA reduction may split the slots across threads from K >= 16, and reduces a [N, K, 1] view
    across lanes: those keep torch's sum."""
    N, K, D = y.shape
    if K >= 16 or D == 1 or N == 0:
        return y.sum(1, dtype=torch.float32).to(dtype)
    out = torch.empty(N, D, device=y.device, dtype=dtype)
    _sum_slots[(N, triton.cdiv(D, SUM_BD))](y.contiguous(), out, D, K=K, BD=SUM_BD, num_warps=4)
    return out


def _row_grid(M: int, E: int, BM: int, cols: int, BN: int) -> tuple[int]:
    """Row tiles (an upper bound: each expert has at most one partial tile) x column blocks, one axis."""
    return ((triton.cdiv(M, BM) + E) * triton.cdiv(cols, BN),)


class GroupedMoE(torch.autograd.Function):
    """out [N, D] = sum_j weights[:, j] * expert_{ids[:, j]}(x); differentiable in x, weights and
    the three stacked expert weights (not in ids)."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
        x, w_gate, w_up, w_down = x.contiguous(), w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
        N, D = x.shape
        E, I, _ = w_gate.shape
        K = ids.shape[1]
        M = N * K
        order, counts, offsets = expert_layout(ids, E)  # one launch at decode sizes (sort.py)
        wflat = weights.float().contiguous().view(-1)
        cfg = launch_config(x.dtype)
        meta = dict(E=E, EP=triton.next_power_of_2(E), UPCAST=upcast_dots(x.dtype), PREC=_prec(x.dtype))
        save = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[2:])
        h = torch.empty(M, I, device=x.device, dtype=x.dtype)
        gu = torch.empty(M, 2 * I, device=x.device, dtype=x.dtype) if save else h
        BM, BN, BK, warps, stages = cfg["gate_up_fwd"]
        _gate_up_fwd[_row_grid(M, E, BM, I, BN)](
            x, w_gate, w_up, order, counts, offsets, h, gu, D, I, TOPK=K, **meta,
            BM=BM, BN=BN, BK=BK, SAVE=save, num_warps=warps, num_stages=stages)
        y = torch.empty(M, D, device=x.device, dtype=x.dtype)
        BM, BN, BK, warps, stages = cfg["down_fwd"]
        _down_fwd[_row_grid(M, E, BM, D, BN)](
            h, w_down, order, wflat, counts, offsets, y, D, I, **meta,
            BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
        out = sum_slots(y.view(N, K, D), x.dtype)
        if save:
            ctx.save_for_backward(x, w_gate, w_up, w_down, order, counts, offsets, wflat, gu)
            ctx.shape, ctx.weights_dtype = (N, K, D, E, I), weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, w_gate, w_up, w_down, order, counts, offsets, wflat, gu = ctx.saved_tensors
        N, K, D, E, I = ctx.shape
        M = N * K
        dout = dout.contiguous().to(x.dtype)
        cfg = launch_config(x.dtype)
        meta = dict(UPCAST=upcast_dots(x.dtype), PREC=_prec(x.dtype))
        rmeta = dict(E=E, EP=triton.next_power_of_2(E), **meta)

        BM, BN, BK, warps, stages = cfg["down_bwd_dh"]
        NB = triton.cdiv(I, BN)
        dgu = torch.empty(M, 2 * I, device=x.device, dtype=x.dtype)
        dw_part = torch.empty(M, NB, device=x.device, dtype=torch.float32)
        _down_bwd_dh[_row_grid(M, E, BM, I, BN)](
            dout, w_down, gu, order, wflat, counts, offsets, dgu, dw_part, D, I, NB, TOPK=K, **rmeta,
            BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
        dweights = dw_part.sum(1).view(N, K)

        dx = None
        if ctx.needs_input_grad[0]:
            BM, BN, BK, warps, stages = cfg["gate_up_bwd_dx"]
            dx_rows = torch.empty(M, D, device=x.device, dtype=x.dtype)
            _gate_up_bwd_dx[_row_grid(M, E, BM, D, BN)](
                dgu, w_gate, w_up, order, counts, offsets, dx_rows, D, I, **rmeta,
                BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
            dx = sum_slots(dx_rows.view(N, K, D), x.dtype)

        BM, BN, BK, warps, stages = cfg["wgrad"]
        common = dict(TOPK=K, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages, **meta)
        # dW_down [E, D, I] = (w dout)^T h, h recomputed from the saved [g, u]
        dwd = torch.empty_like(w_down)
        _wgrad[(triton.cdiv(D, BM), triton.cdiv(I, BN), E)](
            dout, D, 0, gu, 2 * I, order, wflat, offsets, dwd, D, I,
            LEFT_BY_TOKEN=True, SCALE_LEFT=True, RIGHT_BY_TOKEN=False, RIGHT_SILU=True, I_SILU=I, **common)
        # [dW_gate; dW_up] [E, 2I, D] = [dg, du]^T x in one pass over the gathered x
        dwgu = torch.empty(E, 2 * I, D, device=x.device, dtype=w_gate.dtype)
        _wgrad[(triton.cdiv(2 * I, BM), triton.cdiv(D, BN), E)](
            dgu, 2 * I, 0, x, D, order, wflat, offsets, dwgu, 2 * I, D,
            LEFT_BY_TOKEN=False, SCALE_LEFT=False, RIGHT_BY_TOKEN=True, RIGHT_SILU=False, I_SILU=0, **common)
        return dx, None, dweights.to(ctx.weights_dtype), dwgu[:, :I], dwgu[:, I:], dwd


def moe_grouped_triton(x: Tensor, ids: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return GroupedMoE.apply(x, ids, weights, w_gate, w_up, w_down)
