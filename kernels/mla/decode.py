"""Triton absorbed-weight MLA decode over a paged latent cache (split-KV flash decoding).

Each program takes one sequence, one group of BH query heads and one slice of the cached
tokens; all BH heads share every latent row it loads (MQA), and the value is the first
v_dim values of the same row, so one load serves both products when v_dim is the
power-of-two part (512 of 576). Partial results carry their log-sum-exp and a second small
kernel merges the slices. Tokens are gathered row by row through the block table, so the
kernel's token tile does not depend on the cache's block size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots

from kernels.mla.prefill import LOG2E, _split


@triton.jit
def _decode_tile(acc, l_i, m_i, qa, qb, kv, table, start, end, qk_scale,
                 DK: tl.constexpr, DVAL: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BDV: tl.constexpr,
                 PAGE: tl.constexpr, BN: tl.constexpr, SAME_V: tl.constexpr, UPCAST: tl.constexpr,
                 PAGE_TILES: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """One online-softmax step over cached tokens [start, start + BN); tokens >= end are masked (MASK only)."""
    o_a = tl.arange(0, DA)
    o_b = DA + tl.arange(0, DB if DB > 0 else 16)
    o_dv = tl.arange(0, BDV)
    o_n = start + tl.arange(0, BN)
    if PAGE_TILES:  # the whole tile lies in one page: one table read, contiguous rows
        page = tl.load(table + start // PAGE).to(tl.int64)
        row = kv + (page * PAGE + start % PAGE + tl.arange(0, BN))[:, None] * DK
    elif MASK:
        page = tl.load(table + o_n // PAGE, mask=o_n < end, other=0).to(tl.int64)
        row = kv + (page * PAGE + o_n % PAGE)[:, None] * DK
    else:
        page = tl.load(table + o_n // PAGE).to(tl.int64)
        row = kv + (page * PAGE + o_n % PAGE)[:, None] * DK
    m_n = o_n < end
    if MASK:
        ka = tl.load(row + o_a[None, :], mask=m_n[:, None], other=0.0)
    else:
        ka = tl.load(row + o_a[None, :])
    s = mm(qa, tl.trans(ka), UPCAST, PREC)
    if DB > 0:
        if MASK:
            kb = tl.load(row + o_b[None, :], mask=m_n[:, None] & (o_b[None, :] < DK), other=0.0)
        elif DA + DB > DK:
            kb = tl.load(row + o_b[None, :], mask=o_b[None, :] < DK, other=0.0)
        else:
            kb = tl.load(row + o_b[None, :])
        s += mm(qb, tl.trans(kb), UPCAST, PREC)
    if MASK:
        s = tl.where(m_n[None, :], s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if SAME_V:
        b_v = ka
    elif MASK:
        b_v = tl.load(row + o_dv[None, :], mask=m_n[:, None] & (o_dv[None, :] < DVAL), other=0.0)
    else:
        b_v = tl.load(row + o_dv[None, :], mask=o_dv[None, :] < DVAL, other=0.0)
    acc = acc * alpha[:, None] + mm(p.to(b_v.dtype), b_v, UPCAST, PREC)
    return acc, l_i, m_new


@triton.jit
def _decode_split(
    q, kv, block_table, seq_lens, o_part, lse_part, qk_scale, stride_bt,
    H: tl.constexpr, DK: tl.constexpr, DVAL: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BDV: tl.constexpr,
    PAGE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, SAME_V: tl.constexpr, UPCAST: tl.constexpr,
    PAGE_TILES: tl.constexpr, PREC: tl.constexpr,
):
    i_hb, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    L = tl.load(seq_lens + i_b)
    per_split = tl.cdiv(tl.cdiv(L, NS), BN) * BN
    lo = i_s * per_split
    hi = tl.minimum(L, lo + per_split)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    o_a = tl.arange(0, DA)
    q_base = q + (i_b * H + o_h[:, None]) * DK
    qa = tl.load(q_base + o_a[None, :], mask=m_h[:, None], other=0.0)
    if DB > 0:
        o_b = DA + tl.arange(0, DB)
        qb = tl.load(q_base + o_b[None, :], mask=m_h[:, None] & (o_b[None, :] < DK), other=0.0)
    o_dv = tl.arange(0, BDV)

    m_i = tl.full([BH], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, BDV], dtype=tl.float32)
    # whole tiles need no token mask (one select and one masked load fewer per tile); the ragged
    # end of the slice, at most one tile, is a single masked step outside the loop, so that the
    # software pipeliner gives shared-memory buffers to the main loop only
    table = block_table + i_b * stride_bt
    full = lo + tl.maximum(hi - lo, 0) // BN * BN
    for start in range(lo, full, BN):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, qa, qb, kv, table, start, hi, qk_scale,
                                     DK, DVAL, DA, DB, BDV, PAGE, BN, SAME_V, UPCAST, PAGE_TILES, PREC, False)
    if full < hi:
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, qa, qb, kv, table, full, hi, qk_scale,
                                     DK, DVAL, DA, DB, BDV, PAGE, BN, SAME_V, UPCAST, PAGE_TILES, PREC, True)
    # an empty slice leaves l_i = 0 and m_i = -inf: lse = -inf and the merge weights it 0
    part = (i_b * H + o_h) * NS + i_s
    tl.store(lse_part + part, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")), mask=m_h)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_part + part[:, None] * BDV + o_dv[None, :], out, mask=m_h[:, None])


@triton.jit
def _merge(o_part, lse_part, o, DVAL: tl.constexpr, BDV: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr, BHM: tl.constexpr):
    """BHM (sequence, head) rows per program: out = sum_s w_s o_s with w = softmax over splits of lse."""
    rows = tl.program_id(0) * BHM + tl.arange(0, BHM)
    o_s = tl.arange(0, NSP)
    o_dv = tl.arange(0, BDV)
    lse = tl.load(lse_part + rows[:, None] * NS + o_s[None, :], mask=o_s[None, :] < NS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 1)[:, None])
    w = w / tl.sum(w, 1)[:, None]
    out = tl.zeros([BHM, BDV], dtype=tl.float32)
    for i_s in tl.static_range(NS):
        w_s = tl.sum(tl.where(o_s[None, :] == i_s, w, 0.0), 1)
        out += tl.load(o_part + (rows * NS + i_s)[:, None] * BDV + o_dv[None, :]) * w_s[:, None]
    tl.store(o + rows[:, None] * DVAL + o_dv[None, :], out.to(o.dtype.element_ty), mask=o_dv[None, :] < DVAL)


# launch knobs for 16-bit caches (bench/kernels.py sweeps them): heads per program, tokens per
# tile, warps, pipeline stages, and programs per multiprocessor that the KV split aims for. One
# program holds a 64 x 512 fp32 accumulator (255 registers a thread at 8 warps) and 221184 B of
# shared memory (q + two KV tiles), so one program fits a multiprocessor and one wave is best:
# H200 B64 ctx 8192 (2026-11-29 run 4): 2 splits 0.303 ms, 4 splits 0.313, 6 0.331, 8 0.338, 3 0.394.
BLOCK_H, BLOCK_N, NUM_WARPS, NUM_STAGES, PROGRAMS_PER_SM = 64, 64, 8, 2, 1
# fp32 caches double every tile: 64 heads x 64 tokens needs 311552 B of shared memory (sm_90 limit
# 232448); 32 x 32 at 4 warps needs 151680 B (triton 3.9, tests/test_kernels_smem.py). Not a hot path.
FP32_CFG = (32, 32, 4, 2)


def launch_config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(heads per program, tokens per tile, warps, stages) that fit Hopper's shared memory for `dtype`."""
    if dtype == torch.float32:
        return FP32_CFG
    return BLOCK_H, BLOCK_N, NUM_WARPS, NUM_STAGES


def _num_splits(B: int, head_blocks: int, max_len: int, block_n: int, device: torch.device) -> int:
    """KV splits per sequence so that the grid fills the multiprocessors about PROGRAMS_PER_SM
    times over, never with slices shorter than a tile. Any count works (the merge masks its
    tile), so B=64 on 132 SMs gets 2 splits: 128 programs in one wave, and half the partial
    outputs (fp32, written then read back) of the power-of-two rounding's 4."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, round(PROGRAMS_PER_SM * sms / max(1, B * head_blocks)))
    # at most 32: each count compiles its own pair of kernels, and the merge unrolls over splits
    return max(1, min(want, 32, triton.cdiv(max_len, block_n)))


def paged_decode_triton(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                        block_h: int | None = None, block_n: int | None = None, num_splits: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None, max_len: int | None = None,
                        kernel: str = "auto") -> Tensor:
    """kernel: "gluon" (decode_hopper.py, sm_90 only), "triton" (this file's kernel, any GPU and the
    interpreter), or "auto" (gluon where supported and no launch knob is given). Launch knobs left
    None come from launch_config(q.dtype). max_len (the longest seq_lens) only sizes the split;
    without it the block table's capacity stands in, so no device sync is needed."""
    from kernels.mla import decode_hopper

    B, H, DK = q.shape
    PAGE = kv_cache.shape[1]
    if kernel not in ("auto", "gluon", "triton"):
        raise ValueError(f"mla decode: kernel={kernel!r} must be 'auto', 'gluon' or 'triton'")
    knobs = (block_h, block_n, num_warps, num_stages)
    if kernel == "auto":
        kernel = "gluon" if decode_hopper.supported(q, kv_cache, v_dim) and knobs == (None,) * 4 else "triton"
    if kernel == "gluon":
        if not decode_hopper.supported(q, kv_cache, v_dim):
            raise ValueError("mla decode: the gluon kernel needs an sm_90 GPU, a 16-bit 576-wide cache with v_dim 512 "
                             f"and pages of a multiple of 64 tokens; got {q.dtype} q {tuple(q.shape)}, cache "
                             f"{tuple(kv_cache.shape)}, v_dim {v_dim}")
        block_h, block_n = decode_hopper.BH, decode_hopper.BN
    cfg = launch_config(q.dtype)
    block_h = block_h or cfg[0]
    block_n = block_n or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"mla decode: block_n={block_n} must be a power of two >= 16 (tensor-core K dimension)")
    DA, DB = _split(DK)
    BDV = max(16, triton.next_power_of_2(v_dim))
    SAME_V = BDV == v_dim == DA
    BH = max(16, min(block_h, triton.next_power_of_2(H)))
    HB = triton.cdiv(H, BH)
    if num_splits is None:
        if max_len is None:
            max_len = block_table.shape[1] * PAGE  # no device sync: the table bounds every length
        num_splits = _num_splits(B, HB, max_len, block_n, q.device)
    NS = num_splits
    q = q.contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    o_part = torch.empty(B, H, NS, BDV, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, NS, device=q.device, dtype=torch.float32)
    if kernel == "gluon":
        decode_hopper.decode_split(q, kv_cache, block_table, seq_lens, scale * LOG2E, o_part, lse_part)
    else:
        _decode_split[(HB, NS, B)](
            q, kv_cache, block_table, seq_lens, o_part, lse_part, scale * LOG2E, block_table.stride(0),
            H=H, DK=DK, DVAL=v_dim, DA=DA, DB=DB, BDV=BDV, PAGE=PAGE, BH=BH, BN=block_n, NS=NS, SAME_V=SAME_V,
            UPCAST=upcast_dots(q.dtype), PAGE_TILES=PAGE % block_n == 0, PREC="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )
    o = torch.empty(B, H, v_dim, device=q.device, dtype=q.dtype)
    BHM = 4 if B * H % 4 == 0 else 1
    _merge[(B * H // BHM,)](o_part, lse_part, o, DVAL=v_dim, BDV=BDV, NS=NS, NSP=max(2, triton.next_power_of_2(NS)), BHM=BHM,
                            num_warps=4)
    return o
