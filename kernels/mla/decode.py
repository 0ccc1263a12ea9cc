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
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < hi
        if PAGE_TILES:  # the whole tile lies in one page: one table read, contiguous rows
            page = tl.load(block_table + i_b * stride_bt + start // PAGE).to(tl.int64)
            row = kv + (page * PAGE + start % PAGE + tl.arange(0, BN))[:, None] * DK
        else:
            page = tl.load(block_table + i_b * stride_bt + o_n // PAGE, mask=m_n, other=0).to(tl.int64)
            row = kv + (page * PAGE + o_n % PAGE)[:, None] * DK
        ka = tl.load(row + o_a[None, :], mask=m_n[:, None], other=0.0)
        s = mm(qa, tl.trans(ka), UPCAST, PREC)
        if DB > 0:
            kb = tl.load(row + o_b[None, :], mask=m_n[:, None] & (o_b[None, :] < DK), other=0.0)
            s += mm(qb, tl.trans(kb), UPCAST, PREC)
        s = tl.where(m_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SAME_V:
            b_v = ka
        else:
            b_v = tl.load(row + o_dv[None, :], mask=m_n[:, None] & (o_dv[None, :] < DVAL), other=0.0)
        acc = acc * alpha[:, None] + mm(p.to(b_v.dtype), b_v, UPCAST, PREC)
        m_i = m_new
    # an empty slice leaves l_i = 0 and m_i = -inf: lse = -inf and the merge weights it 0
    part = (i_b * H + o_h) * NS + i_s
    tl.store(lse_part + part, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")), mask=m_h)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_part + part[:, None] * BDV + o_dv[None, :], out, mask=m_h[:, None])


@triton.jit
def _merge(o_part, lse_part, o, DVAL: tl.constexpr, BDV: tl.constexpr, NS: tl.constexpr):
    i_bh = tl.program_id(0)
    o_s = tl.arange(0, NS)
    o_dv = tl.arange(0, BDV)
    lse = tl.load(lse_part + i_bh * NS + o_s)
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    parts = tl.load(o_part + (i_bh * NS + o_s)[:, None] * BDV + o_dv[None, :])
    out = tl.sum(parts * w[:, None], 0)
    tl.store(o + i_bh * DVAL + o_dv, out.to(o.dtype.element_ty), mask=o_dv < DVAL)


# launch knobs (bench/kernels.py sweeps them)
BLOCK_H, BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 64, 8, 2


def _num_splits(B: int, head_blocks: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    # about two programs per multiprocessor; power of two for the merge kernel's tile
    want = max(1, (2 * sms) // max(1, B * head_blocks))
    return min(16, triton.next_power_of_2(want))


def paged_decode_triton(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int,
                        block_h: int = BLOCK_H, block_n: int = BLOCK_N, num_splits: int | None = None,
                        num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> Tensor:
    B, H, DK = q.shape
    PAGE = kv_cache.shape[1]
    DA, DB = _split(DK)
    BDV = max(16, triton.next_power_of_2(v_dim))
    SAME_V = BDV == v_dim == DA
    BH = max(16, min(block_h, triton.next_power_of_2(H)))
    HB = triton.cdiv(H, BH)
    NS = num_splits or _num_splits(B, HB, q.device)
    q = q.contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    o_part = torch.empty(B, H, NS, BDV, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, NS, device=q.device, dtype=torch.float32)
    _decode_split[(HB, NS, B)](
        q, kv_cache, block_table, seq_lens, o_part, lse_part, scale * LOG2E, block_table.stride(0),
        H=H, DK=DK, DVAL=v_dim, DA=DA, DB=DB, BDV=BDV, PAGE=PAGE, BH=BH, BN=block_n, NS=NS, SAME_V=SAME_V, UPCAST=upcast_dots(q.dtype),
        PAGE_TILES=PAGE % block_n == 0, PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    o = torch.empty(B, H, v_dim, device=q.device, dtype=q.dtype)
    _merge[(B * H,)](o_part, lse_part, o, DVAL=v_dim, BDV=BDV, NS=NS, num_warps=4)
    return o
