"""Triton GEMM with fp32 output on the tensor cores: out[M, N] = x[M, K] @ w[N, K]^T in fp32.

x is bf16 or fp16. w is either x's dtype or fp32:

- 16-bit w: one 16-bit dot per tile. A 16-bit x 16-bit product is exact in fp32 and the tensor
  cores accumulate in fp32, so this is the fp32 GEMM of the upcast operands up to summation order.
- fp32 w with bf16 x (Ring-2.6's fp32 LM head beside bf16 activations): each w tile is split in
  registers into three bf16 pieces, w = w1 + w2 + w3 exactly (8 + 8 + 8 significand bits, split by
  truncation, so no rounding is involved), and three bf16 dots accumulate x w1 + (x w2 + x w3). Every
  partial product is exact in fp32, so this too is the fp32 GEMM up to summation order, read from
  the fp32 weight in place (no bf16 copy to keep in sync with weight updates), at three bf16 dots
  per tile instead of the fp32 SIMT GEMM.

Tuned for the LM head (N = vocab, K = hidden):
- decode (M <= 512) reads w once: one row tile covers all of M when M <= 64; above that the few row
  tiles of one column block are neighbouring programs (row index fastest), so they read the same w
  tile through L2;
- prefill (large M) groups GROUP_M row tiles per column sweep (the usual L2 swizzle), so x tiles are
  reused as well.
Fixed launch configs chosen by M and w's dtype (no autotuning: a tuning run syncs with the host, and
a CUDA graph may capture the first call). Strided x (the last position of each row of [B, T, K]) is
read in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots

GROUP_M = 8


def launch_config(M: int, w_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) for M rows. Shared memory per program is about
    stages * (BM * BK * 2 + BK * BN * w's bytes) (+ the three bf16 pieces of an fp32 w tile); every
    config stays under Hopper's 227 KiB (tests/test_kernels_linear.py compiles them for sm_90)."""
    split = w_dtype == torch.float32  # an fp32 w tile is twice the bytes: one stage fewer
    if M <= 64:  # memory-bound on w: one row tile, a deep pipeline on w's stream
        BM = max(16, triton.next_power_of_2(M))
        return (BM, 128, 64, 4, 4) if split else (BM, 128, 64, 4, 5)
    if M <= 512:  # decode batches: 128x128 tiles, w shared by the row tiles through L2
        return (128, 128, 64, 8, 3) if split else (128, 128, 64, 8, 4)
    # prefill: the large-tile compute-bound config (the split's three pieces need the registers)
    return (128, 128, 64, 8, 3) if split else (128, 256, 64, 8, 3)


@triton.jit
def _bf16_hi(v):
    """The bf16 value made of v's sign, exponent and top 7 mantissa bits (truncation: exact)."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _gemm_fp32_out(
    x, w, out, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # out-of-range rows/cols read a valid one (their results are never stored): the loads then
    # need a mask only along K, and only when K is no multiple of BK
    rm_c = tl.where(rm < M, rm, 0)
    rn_c = tl.where(rn < N, rn, 0)
    xp = x + rm_c[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    wp = w + rn_c[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # the small pieces' own accumulator: Hopper's tensor cores add into the accumulator without
    # rounding to nearest, so x w2 and x w3 summed into x w1's running total lose most of their bits
    # (a 7.5e-6 relative error on an H200, ~10x cuBLAS's fp32 GEMM); kept apart they keep them
    lo = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(xp)
            b = tl.load(wp)
        else:
            a = tl.load(xp, mask=(k * BK + rk)[None, :] < K, other=0.0)
            b = tl.load(wp, mask=(k * BK + rk)[:, None] < K, other=0.0)
        if SPLIT:
            # fp32 b = b1 + b2 + b3, each exactly bf16; the differences are exact in fp32
            b1 = _bf16_hi(b)
            r = b - b1
            b2 = _bf16_hi(r)
            b3 = r - b2
            acc += mm(a, b1.to(tl.bfloat16), UPCAST, "tf32")
            lo += mm(a, b2.to(tl.bfloat16), UPCAST, "tf32")
            lo += mm(a, b3.to(tl.bfloat16), UPCAST, "tf32")
        else:
            acc += mm(a, b, UPCAST, "tf32")  # PREC only matters for fp32 operands
        xp += BK * stride_xk
        wp += BK * stride_wk
    if SPLIT:
        acc += lo
    op = out + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(op, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def linear_fp32_triton(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] (bf16 or fp16), w [N, K] of x's dtype, or fp32 with bf16 x -> fp32 [..., N]."""
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K)  # a view for the usual layouts (strides are passed through)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out.view(*x.shape[:-1], N)
    if K == 0:
        return out.zero_().view(*x.shape[:-1], N)
    BM, BN, BK, warps, stages = launch_config(M, w.dtype)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _gemm_fp32_out[grid](
        x2, w, out, M, N, K, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
        BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M, EVEN_K=K % BK == 0, SPLIT=w.dtype == torch.float32,
        UPCAST=upcast_dots(x.dtype), num_warps=warps, num_stages=stages,
    )
    return out.view(*x.shape[:-1], N)
