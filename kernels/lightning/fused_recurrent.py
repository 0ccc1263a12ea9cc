"""Triton Lightning decode: one recurrent step for a batch, state slots updated in place.

Memory-bound: each program reads and writes a [K, BV] slice of one slot's state once. The state is
stored fp32 or bf16 (the pool's dtype); the update and the output are fp32 either way, so bf16
storage halves the step's traffic and rounds the state once per step, on the store.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lightning.chunk import rne16


@triton.jit
def _decode_step(
    q, k, v, o, g_gamma, state, slots, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    RNE: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    slot = tl.load(slots + i_b).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    lam = tl.exp(tl.load(g_gamma + i_h).to(tl.float32))
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    p_s = state + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = lam * tl.load(p_s, mask=m_s, other=0.0).to(tl.float32) + b_k[:, None] * b_v[None, :]
    if RNE:  # the CPU interpreter's fp32 -> bf16 cast truncates: round to nearest even as the GPU does
        tl.store(p_s, rne16(b_s).to(state.dtype.element_ty), mask=m_s)
    else:
        tl.store(p_s, b_s.to(state.dtype.element_ty), mask=m_s)
    b_o = tl.sum(b_q[:, None] * b_s, axis=0) * scale  # from the unrounded state
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def decode_lightning_triton(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, state: Tensor, state_slots: Tensor, scale: float,
) -> Tensor:
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v, dtype=q.dtype)
    BK = triton.next_power_of_2(K)
    BV = min(32, triton.next_power_of_2(V))
    grid = (triton.cdiv(V, BV), B * H)
    rne = state.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _decode_step[grid](
        q, k, v, o, g_gamma.float().contiguous(), state, state_slots.contiguous(), scale,
        H=H, K=K, V=V, BK=BK, BV=BV, RNE=rne, num_warps=4,
    )
    return o
