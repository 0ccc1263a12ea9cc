"""Triton flash attention for MLA prefill and training (causal, varlen, fwd + bwd).

The q/k head dim of MLA (nope 128 + rope 64 = 192) is not a power of two, so q and k are
handled as two column tiles, A = the largest power of two <= Dqk and B = the rest (padded),
and every score is qa ka^T + qb kb^T; nothing is padded to 256.
Softmax runs in base 2 (scores pre-multiplied by log2 e); the forward saves the base-2
log-sum-exp per row for the backward, which recomputes the probabilities.
Masks cost: only the blocks on the causal diagonal (and a sequence's ragged end) apply one.
In the backward, rows past the end load lse = +inf (so p = 0) and keys past the end load
k = v = 0 (so they add nothing to dq), which is why those loops need no score mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots

LOG2E = 1.4426950408889634
# (rows, cols, warps, stages) per kernel for 16-bit inputs; bench/kernels.py sweeps them
FWD_CFG = (128, 64, 8, 3)
BWD_KV_CFG = (64, 128, 8, 2)   # (query rows per step, key block, ...)
BWD_Q_CFG = (128, 64, 8, 2)    # (query block, keys per step, ...)
# fp32 inputs double every tile: the 16-bit shapes need 295424 / 279040 / 278528 B of shared
# memory at Dqk=192, Dv=128 (sm_90 limit 232448). Halved tiles need 147712 / 131328 / 131072 B
# (triton 3.9 compiling for sm_90, tests/test_kernels_smem.py). fp32 is the exact-check path,
# not a hot one, so smaller tiles cost nothing that matters.
FP32_FWD_CFG = (64, 64, 8, 2)
FP32_BWD_KV_CFG = (32, 64, 4, 2)
FP32_BWD_Q_CFG = (64, 32, 4, 2)


def launch_config(dtype: torch.dtype) -> tuple[tuple[int, int, int, int], ...]:
    """(forward, backward dk/dv, backward dq) launch configs that fit Hopper's shared memory for `dtype`."""
    if dtype == torch.float32:
        return FP32_FWD_CFG, FP32_BWD_KV_CFG, FP32_BWD_Q_CFG
    return FWD_CFG, BWD_KV_CFG, BWD_Q_CFG


def _split(d: int) -> tuple[int, int]:
    a = 1 << (d.bit_length() - 1)
    if a == d:
        return a, 0
    return a, max(16, triton.next_power_of_2(d - a))


@triton.jit
def _load_qk(ptr, rows, m_rows, stride_t, DQK: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, MASK: tl.constexpr):
    o_a = tl.arange(0, DA)
    if MASK:
        a = tl.load(ptr + rows[:, None] * stride_t + o_a[None, :], mask=m_rows[:, None], other=0.0)
    else:
        a = tl.load(ptr + rows[:, None] * stride_t + o_a[None, :])
    if DB > 0:
        o_b = DA + tl.arange(0, DB)
        if MASK or DA + DB > DQK:
            b = tl.load(ptr + rows[:, None] * stride_t + o_b[None, :],
                        mask=m_rows[:, None] & (o_b[None, :] < DQK), other=0.0)
        else:
            b = tl.load(ptr + rows[:, None] * stride_t + o_b[None, :])
    else:
        b = a  # unused
    return a, b


@triton.jit
def _load_rows(ptr, rows, m_rows, stride_t, DV: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr):
    o_d = tl.arange(0, BDV)
    if MASK or BDV > DV:
        x = tl.load(ptr + rows[:, None] * stride_t + o_d[None, :], mask=m_rows[:, None] & (o_d[None, :] < DV), other=0.0)
    else:
        x = tl.load(ptr + rows[:, None] * stride_t + o_d[None, :])
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, qa, qb, k_ptr, v_ptr, o_m, lo, hi, T, qk_scale,
               H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
               BDV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < T
        ka, kb = _load_qk(k_ptr, o_n, m_n, H * DQK, DQK, DA, DB, MASK)
        s = mm(qa, tl.trans(ka), UPCAST, PREC)
        if DB > 0:
            s += mm(qb, tl.trans(kb), UPCAST, PREC)
        if MASK:
            keep = m_n[None, :]
            if CAUSAL:
                keep = keep & (o_m[:, None] >= o_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        # the scale goes on the row max (BM values) and into one fused multiply-add per score
        # below, not a separate multiply of every score (qk_scale > 0, so the max commutes)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        b_v = _load_rows(v_ptr, o_n, m_n, H * DV, DV, BDV, MASK)
        acc = acc * alpha[:, None] + mm(p.to(b_v.dtype), b_v, UPCAST, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd(
    q, k, v, o, lse, cu_seqlens, qk_scale,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    # long causal rows first: the last query blocks have the most work
    i_m = tl.num_programs(0) - 1 - i_m
    if i_m * BM >= T:
        return
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    qk_base = (bos * H + i_h) * DQK
    v_base = (bos * H + i_h) * DV
    qa, qb = _load_qk(q + qk_base, o_m, m_m, H * DQK, DQK, DA, DB, True)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    if CAUSAL:
        mid = i_m * BM
        hi = tl.minimum(T, (i_m + 1) * BM)
    else:
        mid = T // BN * BN
        hi = T
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, qa, qb, k + qk_base, v + v_base, o_m, 0, mid, T, qk_scale,
                               H, DQK, DV, DA, DB, BDV, BN, False, CAUSAL, UPCAST, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, qa, qb, k + qk_base, v + v_base, o_m, mid, hi, T, qk_scale,
                               H, DQK, DV, DA, DB, BDV, BN, True, CAUSAL, UPCAST, PREC)
    acc = acc / l_i[:, None]
    o_dv = tl.arange(0, BDV)
    tl.store(o + v_base + o_m[:, None] * (H * DV) + o_dv[None, :], acc.to(o.dtype.element_ty), mask=m_m[:, None] & (o_dv[None, :] < DV))
    tl.store(lse + (bos + o_m) * H + i_h, m_i + tl.log2(l_i), mask=m_m)


@triton.jit
def _dkdv_inner(dka, dkb, acc_v, ka, kb, b_v, q_ptr, do_ptr, lse_ptr, delta_ptr, o_n, lo, hi, T, qk_scale,
                H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                BDV: tl.constexpr, BM: tl.constexpr, DIAG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    for start in range(lo, hi, BM):
        o_m = start + tl.arange(0, BM)
        m_m = o_m < T
        qa, qb = _load_qk(q_ptr, o_m, m_m, H * DQK, DQK, DA, DB, True)
        b_do = _load_rows(do_ptr, o_m, m_m, H * DV, DV, BDV, True)
        b_lse = tl.load(lse_ptr + o_m * H, mask=m_m, other=float("inf"))
        b_delta = tl.load(delta_ptr + o_m * H, mask=m_m, other=0.0)
        # transposed scores sT [BN, BM] so that dk and dv come out without extra transposes
        sT = mm(ka, tl.trans(qa), UPCAST, PREC)
        if DB > 0:
            sT += mm(kb, tl.trans(qb), UPCAST, PREC)
        pT = tl.exp2(sT * qk_scale - b_lse[None, :])
        if DIAG:
            pT = tl.where(o_m[None, :] >= o_n[:, None], pT, 0.0)
        acc_v += mm(pT.to(b_do.dtype), b_do, UPCAST, PREC)
        dpT = mm(b_v, tl.trans(b_do), UPCAST, PREC)
        dsT = (pT * (dpT - b_delta[None, :])).to(qa.dtype)
        dka += mm(dsT, qa, UPCAST, PREC)
        if DB > 0:
            dkb += mm(dsT, qb, UPCAST, PREC)
    return dka, dkb, acc_v


@triton.jit
def _bwd_dkdv(
    q, k, v, do, lse, delta, dk, dv, cu_seqlens, qk_scale, scale,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    i_j, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    if i_j * BN >= T:
        return
    o_n = i_j * BN + tl.arange(0, BN)
    m_n = o_n < T
    qk_base = (bos * H + i_h) * DQK
    v_base = (bos * H + i_h) * DV
    ka, kb = _load_qk(k + qk_base, o_n, m_n, H * DQK, DQK, DA, DB, True)
    b_v = _load_rows(v + v_base, o_n, m_n, H * DV, DV, BDV, True)
    dka = tl.zeros([BN, DA], dtype=tl.float32)
    dkb = tl.zeros([BN, DB if DB > 0 else 16], dtype=tl.float32)
    acc_v = tl.zeros([BN, BDV], dtype=tl.float32)
    lse_ptr = lse + bos * H + i_h
    delta_ptr = delta + bos * H + i_h
    if CAUSAL:
        lo = (i_j * BN) // BM * BM
        mid = tl.minimum(T, (i_j + 1) * BN)
        dka, dkb, acc_v = _dkdv_inner(dka, dkb, acc_v, ka, kb, b_v, q + qk_base, do + v_base, lse_ptr, delta_ptr,
                                      o_n, lo, mid, T, qk_scale, H, DQK, DV, DA, DB, BDV, BM, True, UPCAST, PREC)
    else:
        mid = 0
    dka, dkb, acc_v = _dkdv_inner(dka, dkb, acc_v, ka, kb, b_v, q + qk_base, do + v_base, lse_ptr, delta_ptr,
                                  o_n, mid, T, T, qk_scale, H, DQK, DV, DA, DB, BDV, BM, False, UPCAST, PREC)
    o_a = tl.arange(0, DA)
    tl.store(dk + qk_base + o_n[:, None] * (H * DQK) + o_a[None, :], (dka * scale).to(dk.dtype.element_ty), mask=m_n[:, None])
    if DB > 0:
        o_b = DA + tl.arange(0, DB)
        tl.store(dk + qk_base + o_n[:, None] * (H * DQK) + o_b[None, :], (dkb * scale).to(dk.dtype.element_ty),
                 mask=m_n[:, None] & (o_b[None, :] < DQK))
    o_dv = tl.arange(0, BDV)
    tl.store(dv + v_base + o_n[:, None] * (H * DV) + o_dv[None, :], acc_v.to(dv.dtype.element_ty),
             mask=m_n[:, None] & (o_dv[None, :] < DV))


@triton.jit
def _dq_inner(dqa, dqb, qa, qb, b_do, b_lse, b_delta, k_ptr, v_ptr, o_m, lo, hi, T,
              qk_scale, H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
              BDV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, DIAG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < T
        ka, kb = _load_qk(k_ptr, o_n, m_n, H * DQK, DQK, DA, DB, MASK)
        b_v = _load_rows(v_ptr, o_n, m_n, H * DV, DV, BDV, MASK)
        s = mm(qa, tl.trans(ka), UPCAST, PREC)
        if DB > 0:
            s += mm(qb, tl.trans(kb), UPCAST, PREC)
        p = tl.exp2(s * qk_scale - b_lse[:, None])
        if DIAG:
            p = tl.where(o_m[:, None] >= o_n[None, :], p, 0.0)
        dp = mm(b_do, tl.trans(b_v), UPCAST, PREC)
        ds = (p * (dp - b_delta[:, None])).to(ka.dtype)
        dqa += mm(ds, ka, UPCAST, PREC)
        if DB > 0:
            dqb += mm(ds, kb, UPCAST, PREC)
    return dqa, dqb


@triton.jit
def _bwd_dq(
    q, k, v, do, lse, delta, dq, cu_seqlens, qk_scale, scale,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    i_m = tl.num_programs(0) - 1 - i_m
    if i_m * BM >= T:
        return
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    qk_base = (bos * H + i_h) * DQK
    v_base = (bos * H + i_h) * DV
    qa, qb = _load_qk(q + qk_base, o_m, m_m, H * DQK, DQK, DA, DB, True)
    b_do = _load_rows(do + v_base, o_m, m_m, H * DV, DV, BDV, True)
    b_lse = tl.load(lse + (bos + o_m) * H + i_h, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + (bos + o_m) * H + i_h, mask=m_m, other=0.0)
    dqa = tl.zeros([BM, DA], dtype=tl.float32)
    dqb = tl.zeros([BM, DB if DB > 0 else 16], dtype=tl.float32)
    if CAUSAL:
        mid = i_m * BM
        hi = tl.minimum(T, (i_m + 1) * BM)
    else:
        mid = T // BN * BN
        hi = T
    dqa, dqb = _dq_inner(dqa, dqb, qa, qb, b_do, b_lse, b_delta, k + qk_base, v + v_base, o_m, 0, mid, T,
                         qk_scale, H, DQK, DV, DA, DB, BDV, BN, False, False, UPCAST, PREC)
    dqa, dqb = _dq_inner(dqa, dqb, qa, qb, b_do, b_lse, b_delta, k + qk_base, v + v_base, o_m, mid, hi, T,
                         qk_scale, H, DQK, DV, DA, DB, BDV, BN, True, CAUSAL, UPCAST, PREC)
    o_a = tl.arange(0, DA)
    tl.store(dq + qk_base + o_m[:, None] * (H * DQK) + o_a[None, :], (dqa * scale).to(dq.dtype.element_ty), mask=m_m[:, None])
    if DB > 0:
        o_b = DA + tl.arange(0, DB)
        tl.store(dq + qk_base + o_m[:, None] * (H * DQK) + o_b[None, :], (dqb * scale).to(dq.dtype.element_ty),
                 mask=m_m[:, None] & (o_b[None, :] < DQK))


def _meta(q: Tensor, v: Tensor) -> dict:
    DQK, DV = q.shape[-1], v.shape[-1]
    DA, DB = _split(DQK)
    return dict(H=q.shape[2], DQK=DQK, DV=DV, DA=DA, DB=DB, BDV=max(16, triton.next_power_of_2(DV)),
                UPCAST=upcast_dots(q.dtype), PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _seqs(q: Tensor, cu_seqlens: Tensor | None, max_len: int | None = None) -> tuple[Tensor, int, int]:
    """(cu_seqlens over the flattened batch, number of sequences, longest length). The longest
    length sizes the grid: read back from the device (a host sync) unless the caller knows it."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32), B, T
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    return cu, cu.numel() - 1, max_len


class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, cu_seqlens, causal, max_seqlen=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cu, N, max_len = _seqs(q, cu_seqlens, max_seqlen)
        meta = _meta(q, v)
        BM, BN, warps, stages = launch_config(q.dtype)[0]
        o = torch.empty_like(v)
        lse = torch.empty(q.shape[0] * q.shape[1], meta["H"], device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(max_len, BM), N, meta["H"])
        _fwd[grid](q, k, v, o, lse, cu, scale * LOG2E, **meta, BM=BM, BN=BN, CAUSAL=causal,
                   num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.scale, ctx.causal, ctx.N, ctx.max_len = scale, causal, N, max_len
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        do = do.contiguous()
        meta = _meta(q, v)
        H = meta["H"]
        delta = (o.float() * do.float()).sum(-1).reshape(-1, H)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (ctx.scale * LOG2E, ctx.scale)
        _, kv_cfg, q_cfg = launch_config(q.dtype)
        BM, BN, warps, stages = kv_cfg
        _bwd_dkdv[(triton.cdiv(ctx.max_len, BN), ctx.N, H)](
            q, k, v, do, lse, delta, dk, dv, cu, *args, **meta, BM=BM, BN=BN, CAUSAL=ctx.causal,
            num_warps=warps, num_stages=stages)
        BM, BN, warps, stages = q_cfg
        _bwd_dq[(triton.cdiv(ctx.max_len, BM), ctx.N, H)](
            q, k, v, do, lse, delta, dq, cu, *args, **meta, BM=BM, BN=BN, CAUSAL=ctx.causal,
            num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None, None


def flash_attn_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None, causal: bool,
                      max_seqlen: int | None = None) -> Tensor:
    """max_seqlen: the longest sequence of cu_seqlens if the caller knows it (no host sync), >= the true one."""
    return FlashAttnFunction.apply(q, k, v, scale, cu_seqlens, causal, max_seqlen)
