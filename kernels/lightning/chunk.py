"""Triton chunked Lightning attention (forward and backward).

One kernel, `_sweep`, does every pass. It walks the chunks of one (sequence, head, value block)
in order, keeping the running state in registers (never written to memory), and computes
    S_t = lam S_{t-1} + k_scale * k_t^T v_t,    o_t = o_scale * q_t S_t.
Backward is three more sweeps of the same kernel (G_t = dL/dS_t):
    dq: forward time,  (q, k, v) = (do, v, k),  state S^T          -> dq_t = scale do_t S_t^T
    dk: reverse time,  (q, k, v) = (v, do, q),  state G^T, k_scale -> dk_t = v_t G_t^T
    dv: reverse time,  (q, k, v) = (k, q, do),  state G,   k_scale -> dv_t = k_t G_t
with G_t = lam G_{t+1} + scale q_t^T do_t, G_T += dL/dS_T, and dL/dS_0 = lam G_1.
In reverse time the chunks are aligned to the sequence end and the in-chunk index runs
backwards, so the decay algebra is the forward one on r = C-1-i.
Precision: q k^T multiplies 16-bit inputs; A, the state and the decays are fp32, rounded to one or
two bf16 pieces for the other products (see dot32 and SPLIT_STATE).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots

# launch knobs for bf16 inputs (bench/kernels.py sweeps them): chunk length, value-block width,
# warps, pipeline stages. Triton lays a chain of dots (q k^T -> A v) out with every warp along the
# rows, so with a 64-row chunk 8 warps compute each product twice (two warpgroups of 64 rows on the
# same 64 rows); one warpgroup (4 warps) does it once, and a 128 x 64 fp32 state still fits its
# registers (255 a thread, 84 B spilled). H200, B2 T16k H64 D128 bf16 forward (bench/RESULTS.md,
# 2026-11-29 runs 4-6): 64/128/8/3 1.69 ms, 64/64/4/2 1.22 ms, 128/64/8/2 1.68 ms, 64/32/4/2 1.64 ms.
CHUNK, BLOCK_V, NUM_WARPS, NUM_STAGES = 64, 64, 4, 2
# fp32 inputs (or fp32 dot operands for fp16) double every tile, and 256-wide keys double q/k:
# (chunk, value block, warps, stages) that fit the shared memory for those
WIDE_CFG = (64, 64, 8, 2)
# bf16 precision of the fp32 operands (dot32). The state update k^T (v * decay) is split into two bf16
# MMAs: its rounding error is carried from chunk to chunk and into the final state that decode resumes
# from (plain bf16 there: final state 1.6e-3 off; split: ~3e-7). The output products A v and q S feed one
# output tile each, rounded to bf16 right after, so their error does not compound: plain bf16 MMAs
# there give 1.4x the error of rounding the exact output to bf16 (split: 1.0x) for 2 MMAs fewer per
# chunk (5 instead of 7). SPLIT_OUT_* = True restores the split (forward; the three backward sweeps).
# The backward's output products (dq, dk, dv tiles) are plain for the same reason. H200, bench shape
# (bench/RESULTS.md run 8): forward all split 1.15 ms, this 0.91 ms (o 2.35e-3 vs fp64, floor
# 1.66e-3; fla 2.64e-3), all plain 0.76 ms (2.64e-3, final state 1.6e-3); fwd+bwd with the backward
# split 5.76 ms, plain 4.70 ms (gradients 1.4x their bf16 floor, like the output).
SPLIT_STATE, SPLIT_OUT_FWD, SPLIT_OUT_BWD = True, False, False


@triton.jit
def rne16(x):
    """fp32 x rounded to the nearest-even bf16 value, kept in fp32: what the GPU's fp32 -> bf16 cast
    gives. The CPU interpreter's cast truncates, so the interpreted path rounds with this instead."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return ((b >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def dot32(a, b, F32_LEFT: tl.constexpr, BF16: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
          PREC: tl.constexpr):
    """a @ b with one fp32 operand (the left one if F32_LEFT) and one holding exact 16/32-bit inputs.
    BF16 (bf16 inputs): the fp32 operand is rounded to bf16 (hi) for one bf16 MMA; with SPLIT its
    remainder lo = x - hi is a second bf16 MMA into the same accumulator, a ~16-bit mantissa for the
    price of one tf32 MMA (which keeps only 10 bits). UPCAST (the CPU interpreter, which cannot
    multiply bf16) makes the same roundings (rne16) and multiplies them exactly in fp32.
    Else (fp32, fp16 inputs) one fp32 dot at PREC."""
    if BF16:
        if UPCAST:
            if F32_LEFT:
                hi = rne16(a)
                c = tl.dot(hi, b.to(tl.float32), input_precision="ieee")
                if SPLIT:
                    c = tl.dot(rne16(a - hi), b.to(tl.float32), c, input_precision="ieee")
            else:
                hi = rne16(b)
                c = tl.dot(a.to(tl.float32), hi, input_precision="ieee")
                if SPLIT:
                    c = tl.dot(a.to(tl.float32), rne16(b - hi), c, input_precision="ieee")
        elif F32_LEFT:
            hi = a.to(tl.bfloat16)
            c = tl.dot(hi, b)
            if SPLIT:
                c = tl.dot((a - hi.to(tl.float32)).to(tl.bfloat16), b, c)
        else:
            hi = b.to(tl.bfloat16)
            c = tl.dot(a, hi)
            if SPLIT:
                c = tl.dot(a, (b - hi.to(tl.float32)).to(tl.bfloat16), c)
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return c


@triton.jit
def _sweep(
    q, k, v, o, g_gamma, h0, ht, cu_seqlens, o_scale, k_scale,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    PREC: tl.constexpr, F32PREC: tl.constexpr, BF16: tl.constexpr, SPLIT_O: tl.constexpr,
    SPLIT_S: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    g = tl.load(g_gamma + i_h).to(tl.float32)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < KD
    m_v = o_v < VD
    # r: position inside the chunk in the direction of time (reversed for the backward sweeps)
    if REVERSE:
        r = BT - 1 - o_i
    else:
        r = o_i
    causal = r[:, None] >= r[None, :]
    D = tl.exp(tl.where(causal, (r[:, None] - r[None, :]).to(tl.float32) * g, float("-inf")))
    q_decay = tl.exp((r + 1).to(tl.float32) * g)

    h_off = i_nh.to(tl.int64) * KD * VD + o_k[:, None] * VD + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    if USE_H0:
        b_h = tl.load(h0 + h_off, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)

    qk_base = (bos * H + i_h) * KD
    v_base = (bos * H + i_h) * VD
    for i_t in range(0, tl.cdiv(T, BT)):
        if REVERSE:
            t0 = T - (i_t + 1) * BT
        else:
            t0 = i_t * BT
        t = t0 + o_i
        m_t = (t >= 0) & (t < T)
        L = tl.minimum(BT, T - i_t * BT)  # valid steps in this chunk
        p_qk = qk_base + t[:, None] * (H * KD) + o_k[None, :]
        p_v = v_base + t[:, None] * (H * VD) + o_v[None, :]
        b_q = tl.load(q + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)

        # q k^T multiplies the inputs (exact products, fp32 accumulator). A, S and the decays are fp32;
        # dot32 rounds them to bf16 for the MMAs: split in two pieces for the state update (SPLIT_S),
        # one or two pieces for A v and q S (SPLIT_O, see SPLIT_OUT_FWD at the top).
        b_A = mm(b_q, tl.trans(b_k), UPCAST, PREC) * (D * k_scale)
        b_o = dot32(b_A, b_v, True, BF16, SPLIT_O, UPCAST, F32PREC)
        b_o += dot32(b_q, b_h, False, BF16, SPLIT_O, UPCAST, F32PREC) * q_decay[:, None]
        b_o = b_o * o_scale
        if BF16 and UPCAST:  # round as the GPU does (the interpreter's cast truncates)
            b_o = rne16(b_o)
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

        k_decay = tl.exp(tl.where(r < L, (L - 1 - r).to(tl.float32) * g, float("-inf"))) * k_scale
        b_vd = b_v.to(tl.float32) * k_decay[:, None]
        b_h = b_h * tl.exp(L.to(tl.float32) * g) + dot32(tl.trans(b_k), b_vd, False, BF16, SPLIT_S, UPCAST, F32PREC)

    if STORE_HT:
        tl.store(ht + h_off, b_h, mask=m_h)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def launch_config(dtype: torch.dtype, BK: int, VD: int) -> tuple[int, int, int, int]:
    """(chunk, value block, warps, pipeline stages) that fit 232448 B of shared memory (H100/H200).

    Shared memory compiled for sm_90 at KD = VD = 128 (triton 3.9, tests/test_kernels_smem.py):
    bf16 64/64/4/2 106496 B, fp16 (wide) 106496 B, fp32 (wide) 131072 B; session 1 measured the wide
    config at KD = VD = 256: bf16 131072, fp32 229376 (the old fp32 128 x 128, 8 warps, 3 stages
    needed 262144).
    """
    wide = dtype != torch.bfloat16 or BK > 128
    BT, BV, num_warps, num_stages = WIDE_CFG if wide else (CHUNK, BLOCK_V, NUM_WARPS, NUM_STAGES)
    BV = min(BV, _pow2(VD))
    if BK * BV < 128 * 32:  # small heads (the CPU tests): one warpgroup is plenty
        num_warps = 4
    return BT, BV, num_warps, num_stages


def sweep(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, cu_seqlens: Tensor, o_scale: float, k_scale: float,
    h0: Tensor | None, store_ht: bool, reverse: bool, split_out: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """q,k [1 or B, T, H, KD], v [.., VD] contiguous; cu_seqlens [N+1] int32 over the flattened B*T."""
    H, KD, VD = q.shape[2], q.shape[3], v.shape[3]
    N = cu_seqlens.numel() - 1
    BK = _pow2(KD)
    if BK > 256:
        raise ValueError(f"lightning: key head dim {KD} > 256 is not supported by the Triton kernel")
    BT, BV, num_warps, num_stages = launch_config(q.dtype, BK, VD)
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, KD, VD, dtype=torch.float32) if store_ht else None
    upcast = upcast_dots(q.dtype)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # fp32 dot operands for 16-bit inputs: bf16 rounds them to one or two bf16 pieces (dot32, also under
    # the interpreter); fp16 multiplies them with three tf32 passes (near-ieee, fp16 is not a hot path)
    f32prec = "ieee" if q.dtype == torch.float32 else "tf32x3"
    grid = (triton.cdiv(VD, BV), N * H)
    _sweep[grid](
        q, k, v, o, g_gamma, h0, ht, cu_seqlens, o_scale, k_scale,
        H=H, KD=KD, VD=VD, BT=BT, BK=BK, BV=BV,
        REVERSE=reverse, USE_H0=h0 is not None, STORE_HT=store_ht,
        PREC=prec, F32PREC=f32prec, BF16=q.dtype == torch.bfloat16, SPLIT_O=split_out, SPLIT_S=SPLIT_STATE,
        UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, ht


class LightningFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens):
        B, T = q.shape[:2]
        if cu_seqlens is None:
            cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        else:
            cu = cu_seqlens.to(torch.int32)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = g_gamma.float().contiguous()
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = sweep(q, k, v, g, cu, scale, 1.0, h0, output_final_state, reverse=False, split_out=SPLIT_OUT_FWD)
        ctx.save_for_backward(q, k, v, g, h0, cu)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous()
        h0T = h0.transpose(-1, -2).contiguous() if h0 is not None else None
        dq, _ = sweep(do, v, k, g, cu, scale, 1.0, h0T, False, reverse=False, split_out=SPLIT_OUT_BWD)
        if dht is not None:
            # the sweep decays a carried-in state once before the first step it meets, but
            # G_T = dht + scale q_T^T do_T takes dht undecayed: pre-divide by lam
            dht = (dht * (-g).exp()[None, :, None, None]).contiguous()
        dhtT = dht.transpose(-1, -2).contiguous() if dht is not None else None
        dk, _ = sweep(v, do, q, g, cu, 1.0, scale, dhtT, False, reverse=True, split_out=SPLIT_OUT_BWD)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dv, G1 = sweep(k, q, do, g, cu, 1.0, scale, dht, need_dh0, reverse=True, split_out=SPLIT_OUT_BWD)
        dh0 = G1 * g.exp()[None, :, None, None] if need_dh0 else None
        return dq, dk, dv, None, None, dh0, None, None


def chunk_lightning_triton(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens):
    return LightningFunction.apply(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens)
