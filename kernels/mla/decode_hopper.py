"""MLA decode for Hopper (sm_90) in Gluon, Triton's explicit-layout dialect.

Same math and the same split-KV partial outputs as decode.py (whose plain-Triton kernel stays
the portable path and the one the CPU interpreter runs); this one exists because Triton's
automatic layouts cap that kernel at ~46% of copy bandwidth on an H200 (bench/RESULTS.md):

- Triton lays out q k^T over all 8 warps along the 64 head rows ("chained dot" rule), so both
  warpgroups compute the same 64 x 64 scores, and with n=32 instructions that re-read q from
  shared memory twice: shared-memory bound. Here the scores use warps [4, 2]: each warpgroup
  computes half the tokens of the tile, once.
- p v keeps Triton's split: each warpgroup owns 256 of the 512 value columns (64 x 256 fp32
  accumulator, 128 registers a thread), and gets the whole p tile through one layout conversion.
- Tiles arrive by TMA (one thread issues nine 64 x 64 boxes per tile, completing on an mbarrier)
  into two shared-memory stages, so the next tile loads while this one is computed.

Shared memory: q 72 KB + 2 stages x 72 KB = 216 KB (+ barriers and reduction scratch), one
program per multiprocessor. Needs: 16-bit dtype, 576 = 512 latent + 64 rope, v_dim 512, pages a
multiple of 64 tokens (a tile never straddles pages), heads in blocks of 64 (fewer are padded).
A tile is loaded whole, so the rows of a sequence's last page past its length are read (their
weight is exactly 0): they must hold finite values, as a zero-initialised cache does.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

try:  # Gluon ships with Triton >= 3.5; without it (or off sm_90) decode.py's kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BH, BN, DL, DR = 64, 64, 512, 64  # heads per program (one wgmma M), tokens per tile, latent, rope
NUM_WARPS = 8


def supported(q: Tensor, kv_cache: Tensor, v_dim: int) -> bool:
    """True when this kernel can take the call (else decode.py's plain-Triton kernel does)."""
    return (HAVE_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == DL + DR and v_dim == DL
            and kv_cache.shape[1] % BN == 0 and kv_cache.is_contiguous() and kv_cache.data_ptr() % 16 == 0)


if HAVE_GLUON:
    # names that moved between Gluon releases (3.6 on the H200 image, 3.9 in requirements.txt)
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _load_rows(desc, row, lat, rope, bar):
        """TMA rows [row, row + 64) of a [*, 576] tensor: eight 64 x 64 boxes into the latent buffer
        (a 128-byte-swizzled [64, 512] buffer is exactly eight such boxes side by side), one into rope."""
        DL: gl.constexpr = lat.shape[1]
        mbarrier.expect(bar, desc.block_type.nbytes * (DL // 64 + 1))
        for c in gl.static_range(DL // 64):
            _tma_load(desc, [row, c * 64], bar, lat.slice(c * 64, 64, dim=1))
        _tma_load(desc, [row, DL], bar, rope)

    @gluon.jit
    def _load_tile(kv_desc, table, start, PAGE: gl.constexpr, lat, rope, bar):
        """The 64 cached tokens from `start` (one page holds them all) into one stage."""
        page = gl.load(table + start // PAGE).to(gl.int32)
        _load_rows(kv_desc, page * PAGE + start % PAGE, lat, rope, bar)

    @gluon.jit
    def _decode_split_hopper(q_desc, kv_desc, block_table, seq_lens, o_part, lse_part, qk_scale, stride_bt,
                             H: gl.constexpr, NS: gl.constexpr, PAGE: gl.constexpr, BH: gl.constexpr, BN: gl.constexpr,
                             DL: gl.constexpr, DR: gl.constexpr):
        i_hb = gl.program_id(0)
        i_s = gl.program_id(1)
        i_b = gl.program_id(2)
        L = gl.load(seq_lens + i_b)
        per_split = gl.cdiv(gl.cdiv(L, NS), BN) * BN
        lo = i_s * per_split
        hi = gl.minimum(L, lo + per_split)
        n = gl.cdiv(gl.maximum(hi - lo, 0), BN)
        table = block_table + i_b.to(gl.int64) * stride_bt

        dtype: gl.constexpr = kv_desc.dtype
        sl2: gl.constexpr = kv_desc.layout  # 128-byte swizzle; a [64, 512] buffer is eight 64-column boxes
        q_lat = gl.allocate_shared_memory(dtype, [BH, DL], sl2)
        q_rope = gl.allocate_shared_memory(dtype, [BH, DR], sl2)
        k_lat = gl.allocate_shared_memory(dtype, [2, BN, DL], sl2)
        k_rope = gl.allocate_shared_memory(dtype, [2, BN, DR], sl2)
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(3):
            mbarrier.init(bars.index(i), count=1)
        q_bar = bars.index(2)

        # rows past this sequence's heads are the next sequence's or zero fill (TMA bounds); never stored
        _load_rows(q_desc, i_b * H + i_hb * BH, q_lat, q_rope, q_bar)
        if n > 0:
            _load_tile(kv_desc, table, lo, PAGE, k_lat.index(0), k_rope.index(0), bars.index(0))
        if n > 1:
            _load_tile(kv_desc, table, lo + BN, PAGE, k_lat.index(1), k_rope.index(1), bars.index(1))

        # scores: warpgroup g computes tokens [32 g, 32 g + 32) of the tile for all 64 heads
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 32, 16])
        # output: warpgroup g owns value columns [256 g, 256 g + 256)
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 256, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        m_i = gl.full([BH], float("-inf"), gl.float32, row_s)
        # softmax denominators kept per score element and summed once at the end: a row sum
        # spans both warpgroups, and the max already costs one shared-memory exchange a tile
        l_i = gl.zeros([BH, BN], gl.float32, s_layout)
        acc = gl.zeros([BH, DL], gl.float32, o_layout)
        s_zero = gl.zeros([BH, BN], gl.float32, s_layout)
        o_tok = gl.arange(0, BN, gl.SliceLayout(0, s_layout))
        mbarrier.wait(q_bar, 0)
        for j in range(n):
            st = j % 2
            mbarrier.wait(bars.index(st), (j // 2) & 1)
            kl = k_lat.index(st)
            kr = k_rope.index(st)
            s = warpgroup_mma(q_lat, kl.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, kr.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            s = gl.where((lo + j * BN + o_tok)[None, :] < hi, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            p = gl.exp2(s - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha[:, None] + p
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), kl, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            # both warpgroups are done reading this stage before one thread refills it
            _cta_barrier()
            if j + 2 < n:
                _load_tile(kv_desc, table, lo + (j + 2) * BN, PAGE, kl, kr, bars.index(st))
        for i in gl.static_range(3):
            mbarrier.invalidate(bars.index(i))

        # an empty slice leaves l = 0, m = -inf: lse = -inf and the merge weights it 0
        l_i = gl.sum(l_i, 1)
        o_h = i_hb * BH + gl.arange(0, BH, row_s)
        part = (i_b * H + o_h) * NS + i_s
        lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        gl.store(lse_part + part, lse, mask=o_h < H)
        l_o = gl.convert_layout(l_i, row_o)
        out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
        o_ho = i_hb * BH + gl.arange(0, BH, row_o)
        o_dv = gl.arange(0, DL, gl.SliceLayout(0, o_layout))
        part_o = (i_b * H + o_ho) * NS + i_s
        gl.store(o_part + part_o[:, None] * DL + o_dv[None, :], out, mask=(o_ho < H)[:, None])


def smem_layout(dtype: torch.dtype):
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=torch.finfo(dtype).bits, rank=2)


def decode_split(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, qk_scale: float,
                 o_part: Tensor, lse_part: Tensor) -> None:
    """Fill o_part [B,H,NS,512] fp32 and lse_part [B,H,NS] (log2 units) like decode.py's _decode_split."""
    B, H, DK = q.shape
    NS = o_part.shape[2]
    layout = smem_layout(q.dtype)
    q2 = q.reshape(B * H, DK)
    if q2.data_ptr() % 16:  # TMA needs a 16-byte aligned base
        q2 = q2.clone()
    kv2 = kv_cache.view(-1, DK)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BH, 64], layout)
    kv_desc = TensorDescriptor(kv2, list(kv2.shape), list(kv2.stride()), [BN, 64], layout)
    _decode_split_hopper[(triton.cdiv(H, BH), NS, B)](
        q_desc, kv_desc, block_table, seq_lens, o_part, lse_part, qk_scale, block_table.stride(0),
        H=H, NS=NS, PAGE=kv_cache.shape[1], BH=BH, BN=BN, DL=DL, DR=DR, num_warps=NUM_WARPS)
