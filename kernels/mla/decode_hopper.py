"""MLA decode for Hopper (sm_90) in Gluon, Triton's explicit-layout dialect: FlashMLA's shape.

Same math and the same split-KV partial outputs as decode.py, whose plain-Triton kernel stays the
portable path (any GPU, and the CPU interpreter in the tests). Triton's automatic layouts hold
that kernel at ~46% of copy bandwidth on an H200: they lay q k^T over all 8 warps along the 64
head rows (the "chained dot" rule), so both warpgroups compute the same scores, and load,
q k^T, softmax and p v run one after another. Here each program is three partitions:

- producer (1 warp): TMA of q once, then of each 64-token tile (nine 64 x 64 boxes) into one of
  two shared-memory stages as soon as both warpgroups are done with it;
- warpgroup 0 (default partition): q k^T for the whole tile (one warpgroup, so no duplicate),
  online softmax within its own warps, p and the rescale factors to shared memory for warpgroup
  1, then p v for value columns [0, 256);
- warpgroup 1: p v for value columns [256, 512), while warpgroup 0 goes on to the next tile.

Each warpgroup holds a 64 x 256 fp32 accumulator (128 registers a thread). Shared memory: q
72 KB + 2 stages x 72 KB + p 8 KB = 224.5 KB, one program per multiprocessor. Needs: 16-bit
dtype, 576 = 512 latent + 64 rope, v_dim 512, pages a multiple of 64 tokens (a tile never
straddles pages); heads go in blocks of 64 (fewer are padded). A tile is loaded whole, so the
rows of a sequence's last page past its length are read (their weight is exactly 0): they must
hold finite values, as a zero-initialised cache does.
"""
from __future__ import annotations

import functools

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
STAGES = 2  # shared-memory stages of BN tokens each (4 stages of 32 tokens measured slower: RESULTS.md)
NUM_WARPS = 4  # the default partition (warpgroup 0); warp_specialize adds warpgroup 1 and the producer


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def supported(q: Tensor, kv_cache: Tensor, v_dim: int) -> bool:
    """True when this kernel can take the call (else decode.py's plain-Triton kernel does)."""
    return (HAVE_GLUON and q.is_cuda and _is_sm90(q.device)
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == DL + DR and v_dim == DL
            and kv_cache.shape[1] % BN == 0 and kv_cache.is_contiguous() and kv_cache.data_ptr() % 16 == 0)


if HAVE_GLUON:
    # renamed between Gluon releases (3.6 on the H200 image, 3.9 in requirements.txt)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _load_rows(desc, row, lat, rope, bar):
        """TMA one block of rows from `row` of a [*, 576] tensor: eight 64-column boxes into the latent
        buffer (a 128-byte-swizzled [rows, 512] buffer is exactly eight such boxes side by side), one
        into rope."""
        DL: gl.constexpr = lat.shape[1]
        mbarrier.expect(bar, desc.block_type.nbytes * (DL // 64 + 1))
        for c in gl.static_range(DL // 64):
            _tma_load(desc, [row, c * 64], bar, lat.slice(c * 64, 64, dim=1))
        _tma_load(desc, [row, DL], bar, rope)

    @gluon.jit
    def _load_tile(kv_desc, table, start, PAGE: gl.constexpr, lat, rope, bar):
        """The BN cached tokens from `start` (one page holds them all) into one stage."""
        page = gl.load(table + start // PAGE).to(gl.int32)
        _load_rows(kv_desc, page * PAGE + start % PAGE, lat, rope, bar)

    @gluon.jit
    def _store_half(acc, l, o_part, pbase, h0, COL0: gl.constexpr, NS: gl.constexpr, H: gl.constexpr):
        """acc / l (l in acc's row layout) into value columns [COL0, COL0 + width) of the partial
        outputs of heads h0.. (o_part rows of 2 x width values)."""
        layout: gl.constexpr = acc.type.layout
        BH: gl.constexpr = acc.shape[0]
        W: gl.constexpr = acc.shape[1]
        out = acc / gl.where(l > 0, l, 1.0)[:, None]
        o_h = h0 + gl.arange(0, BH, gl.SliceLayout(1, layout))
        o_dv = COL0 + gl.arange(0, W, gl.SliceLayout(0, layout))
        gl.store(o_part + (pbase + o_h * NS)[:, None] * (2 * W) + o_dv[None, :], out, mask=(o_h < H)[:, None])

    @gluon.jit
    def _ws_producer(q_desc, kv_desc, table, lo, n, q_row, PAGE: gl.constexpr, q_lat, q_rope, k_lat, k_rope, bars):
        """One warp: TMA q, then each tile into a stage as soon as both warpgroups are done with it."""
        _load_rows(q_desc, q_row, q_lat, q_rope, bars.index(0))
        NST: gl.constexpr = k_lat.shape[0]
        BN: gl.constexpr = k_lat.shape[1]
        for j in range(n):
            st = j % NST
            mbarrier.wait(bars.index(1 + NST + st), ((j // NST) & 1) ^ 1)  # stage free (a fresh barrier passes phase 1)
            _load_tile(kv_desc, table, lo + j * BN, PAGE, k_lat.index(st), k_rope.index(st), bars.index(1 + st))

    @gluon.jit
    def _ws_pv_half(n, k_lat, p_smem, a_smem, bars, o_part, pbase, NS: gl.constexpr, H: gl.constexpr, h0):
        """Warpgroup 1: p v for value columns [256, 512), p and the rescale factors from warpgroup 0."""
        BH: gl.constexpr = p_smem.shape[0]
        NST: gl.constexpr = k_lat.shape[0]
        HALF: gl.constexpr = k_lat.shape[2] // 2
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        acc = gl.zeros([BH, HALF], gl.float32, o_layout)
        for j in range(n):
            st = j % NST
            mbarrier.wait(bars.index(1 + st), (j // NST) & 1)  # the tile (already seen by warpgroup 0)
            mbarrier.wait(bars.index(1 + 2 * NST), j & 1)  # p ready
            acc = acc * a_smem.load(row_o)[:, None]
            acc = warpgroup_mma(p_smem, k_lat.index(st).slice(HALF, HALF, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(bars.index(2 + 2 * NST), count=1)  # p and the factors consumed
            mbarrier.arrive(bars.index(1 + NST + st), count=1)  # this warpgroup is done with the stage
        mbarrier.wait(bars.index(3 + 2 * NST), 0)  # the softmax denominators are in a_smem
        _store_half(acc, a_smem.load(row_o), o_part, pbase, h0, HALF, NS, H)

    @gluon.jit
    def _ws_softmax(n, lo, hi, qk_scale, q_lat, q_rope, k_lat, k_rope, p_smem, a_smem, bars, o_part, lse_part, pbase,
                    NS: gl.constexpr, H: gl.constexpr, h0):
        """Warpgroup 0 (the default partition): q k^T for the whole tile, online softmax, p to shared
        memory for warpgroup 1, and p v for value columns [0, 256)."""
        BH: gl.constexpr = q_lat.shape[0]
        NST: gl.constexpr = k_lat.shape[0]
        BN: gl.constexpr = k_lat.shape[1]
        HALF: gl.constexpr = k_lat.shape[2] // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        m_i = gl.full([BH], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BH], gl.float32, row_s)
        acc = gl.zeros([BH, HALF], gl.float32, o_layout)
        s_zero = gl.zeros([BH, BN], gl.float32, s_layout)
        o_tok = gl.arange(0, BN, gl.SliceLayout(0, s_layout))
        mbarrier.wait(bars.index(0), 0)  # q
        for j in range(n):
            st = j % NST
            mbarrier.wait(bars.index(1 + st), (j // NST) & 1)
            kl = k_lat.index(st)
            s = warpgroup_mma(q_lat, kl.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, k_rope.index(st).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            s = gl.where((lo + j * BN + o_tok)[None, :] < hi, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            p = gl.exp2(s - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            p = p.to(kl.dtype)
            mbarrier.wait(bars.index(2 + 2 * NST), (j & 1) ^ 1)  # warpgroup 1 is done with the previous p
            p_smem.store(p)
            a_smem.store(alpha)
            fence_async_shared()
            mbarrier.arrive(bars.index(1 + 2 * NST), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p, p_layout), kl.slice(0, HALF, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(bars.index(1 + NST + st), count=1)
        mbarrier.wait(bars.index(2 + 2 * NST), (n & 1) ^ 1)  # warpgroup 1 has read the last factors
        a_smem.store(l_i)
        mbarrier.arrive(bars.index(3 + 2 * NST), count=1)
        o_h = h0 + gl.arange(0, BH, row_s)
        lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        gl.store(lse_part + pbase + o_h * NS, lse, mask=o_h < H)
        _store_half(acc, gl.convert_layout(l_i, row_o), o_part, pbase, h0, 0, NS, H)

    @gluon.jit
    def _decode_split_hopper(q_desc, kv_desc, block_table, seq_lens, o_part, lse_part, qk_scale, stride_bt,
                             H: gl.constexpr, NS: gl.constexpr, PAGE: gl.constexpr, BH: gl.constexpr, BN: gl.constexpr,
                             DL: gl.constexpr, DR: gl.constexpr, NST: gl.constexpr):
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
        sl: gl.constexpr = kv_desc.layout
        q_lat = gl.allocate_shared_memory(dtype, [BH, DL], sl)
        q_rope = gl.allocate_shared_memory(dtype, [BH, DR], sl)
        k_lat = gl.allocate_shared_memory(dtype, [NST, BN, DL], sl)
        k_rope = gl.allocate_shared_memory(dtype, [NST, BN, DR], sl)
        p_smem = gl.allocate_shared_memory(dtype, [BH, BN], gl.NVMMASharedLayout.get_default_for([BH, BN], dtype))
        a_smem = gl.allocate_shared_memory(gl.float32, [BH], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # barriers: 0 q ready; 1.. stage ready; 1 + NST.. stage free (both warpgroups arrive);
        # 1 + 2 NST p ready; 2 + 2 NST p consumed; 3 + 2 NST softmax denominators ready
        bars = gl.allocate_shared_memory(gl.int64, [4 + 2 * NST, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4 + 2 * NST):
            mbarrier.init(bars.index(i), count=2 if NST < i and i <= 2 * NST else 1)
        h0 = i_hb * BH
        pbase = i_b * H * NS + i_s  # partial (sequence, head h, split) is row pbase + h * NS of o_part
        gl.warp_specialize([
            (_ws_softmax, (n, lo, hi, qk_scale, q_lat, q_rope, k_lat, k_rope, p_smem, a_smem, bars, o_part, lse_part,
                           pbase, NS, H, h0)),
            (_ws_pv_half, (n, k_lat, p_smem, a_smem, bars, o_part, pbase, NS, H, h0)),
            (_ws_producer, (q_desc, kv_desc, table, lo, n, i_b * H + h0, PAGE, q_lat, q_rope, k_lat, k_rope, bars)),
        ], [4, 1], [232, 24])  # worker warps and registers: warpgroup 1 needs ~170, the producer the minimum


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
    PAGE = kv_cache.shape[1]
    _decode_split_hopper[(triton.cdiv(H, BH), NS, B)](
        q_desc, kv_desc, block_table, seq_lens, o_part, lse_part, qk_scale, block_table.stride(0),
        H=H, NS=NS, PAGE=PAGE, BH=BH, BN=BN, DL=DL, DR=DR, NST=STAGES, num_warps=NUM_WARPS)
