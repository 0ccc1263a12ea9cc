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
Precision: only q k^T multiplies 16-bit inputs; A, the state and the decays stay fp32 (see dot32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import mm, upcast_dots

CHUNK = 64
# launch knobs (bench/kernels.py sweeps them): value-block width and warps per program
BLOCK_V = 128
NUM_WARPS = 8
NUM_STAGES = 3


@triton.jit
def dot32(a, b, F32_LEFT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with one fp32 operand (the left one if F32_LEFT) and one holding exact 16/32-bit inputs.
    SPLIT (bf16 inputs, compiled): the fp32 operand is split into bf16 hi + lo, two bf16 MMAs give a
    ~16-bit mantissa for the price of one tf32 MMA (which keeps only 10 bits). Else fp32 at PREC."""
    if SPLIT:
        if F32_LEFT:
            hi = a.to(tl.bfloat16)
            lo = (a - hi.to(tl.float32)).to(tl.bfloat16)
            c = tl.dot(hi, b) + tl.dot(lo, b)
        else:
            hi = b.to(tl.bfloat16)
            lo = (b - hi.to(tl.float32)).to(tl.bfloat16)
            c = tl.dot(a, hi) + tl.dot(a, lo)
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return c


@triton.jit
def _sweep(
    q, k, v, o, g_gamma, h0, ht, cu_seqlens, o_scale, k_scale,
    H: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    PREC: tl.constexpr, F32PREC: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
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

        # Only q k^T multiplies in the input dtype (exact products, fp32 accumulator). o = A v + q S and
        # the state update sum large terms that mostly cancel, so A, S and the decays stay fp32 (dot32);
        # rounding them to bf16 first (as fla does) gave ~5x the error of rounding o itself.
        b_A = mm(b_q, tl.trans(b_k), UPCAST, PREC) * (D * k_scale)
        b_o = dot32(b_A, b_v, True, SPLIT, F32PREC)
        b_o += dot32(b_q, b_h, False, SPLIT, F32PREC) * q_decay[:, None]
        tl.store(o + p_v, (b_o * o_scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

        k_decay = tl.exp(tl.where(r < L, (L - 1 - r).to(tl.float32) * g, float("-inf"))) * k_scale
        b_vd = b_v.to(tl.float32) * k_decay[:, None]
        b_h = b_h * tl.exp(L.to(tl.float32) * g) + dot32(tl.trans(b_k), b_vd, False, SPLIT, F32PREC)

    if STORE_HT:
        tl.store(ht + h_off, b_h, mask=m_h)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def launch_config(dtype: torch.dtype, BK: int, VD: int) -> tuple[int, int, int]:
    """(value block, warps, pipeline stages) that fit 232448 B of shared memory (H100/H200).

    A wide value block amortises q k^T over V, and a 128 x 128 fp32 state still fits 8 warps'
    registers. fp32 inputs (or fp32 dot operands for fp16) double every tile, and 256-wide keys
    double q/k: both halve the value block and drop to 2 stages. Shared memory compiled for sm_90
    (triton 3.9, KD = VD): bf16 128 98304 B, 256 131072; fp16 128 65536, 256 131072; fp32 128
    131072, 256 229376 (the old fp32 128 at 128/8/3 needed 262144). All launch fwd+bwd on an H200.
    """
    wide = dtype != torch.bfloat16 or BK > 128
    BV = min(BLOCK_V // 2 if wide else BLOCK_V, _pow2(VD))
    num_warps = NUM_WARPS if BK * BV >= 128 * 32 else 4
    return BV, num_warps, min(NUM_STAGES, 2) if wide else NUM_STAGES


def sweep(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, cu_seqlens: Tensor, o_scale: float, k_scale: float,
    h0: Tensor | None, store_ht: bool, reverse: bool,
) -> tuple[Tensor, Tensor | None]:
    """q,k [1 or B, T, H, KD], v [.., VD] contiguous; cu_seqlens [N+1] int32 over the flattened B*T."""
    H, KD, VD = q.shape[2], q.shape[3], v.shape[3]
    N = cu_seqlens.numel() - 1
    BK = _pow2(KD)
    if BK > 256:
        raise ValueError(f"lightning: key head dim {KD} > 256 is not supported by the Triton kernel")
    BV, num_warps, num_stages = launch_config(q.dtype, BK, VD)
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, KD, VD, dtype=torch.float32) if store_ht else None
    upcast = upcast_dots(q.dtype)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # fp32 dots for 16-bit inputs: bf16 splits into two bf16 MMAs (dot32); fp16, or bf16 under the
    # interpreter, multiplies fp32 operands with three tf32 passes (near-ieee, fp16 is not a hot path)
    f32prec = "ieee" if q.dtype == torch.float32 else "tf32x3"
    grid = (triton.cdiv(VD, BV), N * H)
    _sweep[grid](
        q, k, v, o, g_gamma, h0, ht, cu_seqlens, o_scale, k_scale,
        H=H, KD=KD, VD=VD, BT=CHUNK, BK=BK, BV=BV,
        REVERSE=reverse, USE_H0=h0 is not None, STORE_HT=store_ht,
        PREC=prec, F32PREC=f32prec, SPLIT=q.dtype == torch.bfloat16 and not upcast, UPCAST=upcast,
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
        o, ht = sweep(q, k, v, g, cu, scale, 1.0, h0, output_final_state, reverse=False)
        ctx.save_for_backward(q, k, v, g, h0, cu)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous()
        h0T = h0.transpose(-1, -2).contiguous() if h0 is not None else None
        dq, _ = sweep(do, v, k, g, cu, scale, 1.0, h0T, False, reverse=False)
        if dht is not None:
            # the sweep decays a carried-in state once before the first step it meets, but
            # G_T = dht + scale q_T^T do_T takes dht undecayed: pre-divide by lam
            dht = (dht * (-g).exp()[None, :, None, None]).contiguous()
        dhtT = dht.transpose(-1, -2).contiguous() if dht is not None else None
        dk, _ = sweep(v, do, q, g, cu, 1.0, scale, dhtT, False, reverse=True)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dv, G1 = sweep(k, q, do, g, cu, 1.0, scale, dht, need_dh0, reverse=True)
        dh0 = G1 * g.exp()[None, :, None, None] if need_dh0 else None
        return dq, dk, dv, None, None, dh0, None, None


def chunk_lightning_triton(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens):
    return LightningFunction.apply(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens)
