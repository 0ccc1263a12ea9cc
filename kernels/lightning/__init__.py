"""Lightning attention (Ring-2.6 linear attention = simple-GLA with constant per-head decay).

    S_t = exp(g_h) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

`lightning_attn` is the chunked form for training and prefill; `lightning_decode` is one
step for a batch of running sequences whose states live in a slot pool (fp32, or bf16 storage
with fp32 arithmetic: the rollout engine's opt-in to halve a decode step's state traffic).
Triton on CUDA, the torch reference (naive.py) on CPU; KPOP_KERNELS overrides (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend, check
from kernels.lightning.naive import chunk_lightning, decode_lightning, recurrent_lightning

__all__ = ["lightning_attn", "lightning_decode", "chunk_lightning", "recurrent_lightning", "decode_lightning"]


def lightning_attn(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """q, k [B,T,H,K]; v [B,T,H,V]; g_gamma [H] (< 0); initial_state [N,H,K,V] fp32.

    With cu_seqlens ([N+1] int32, starts at 0, ends at T) the B == 1 batch holds N packed sequences.
    Returns o [B,T,H,V] in q.dtype and the fp32 final state [N,H,K,V] (None unless asked).
    """
    check(q.dim() == 4 and k.shape == q.shape, f"lightning_attn: q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B,T,H,K]")
    B, T, H, K = q.shape
    check(v.dim() == 4 and v.shape[:3] == q.shape[:3], f"lightning_attn: v {tuple(v.shape)} must be [B,T,H,V] matching q {tuple(q.shape)}")
    V = v.shape[-1]
    check(q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype, f"lightning_attn: q/k/v need one float dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    check(g_gamma.shape == (H,), f"lightning_attn: g_gamma must be [H]={H}, got {tuple(g_gamma.shape)}")
    if cu_seqlens is not None:
        check(B == 1, f"lightning_attn: cu_seqlens needs B == 1 (packed), got B={B}")
        check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and not cu_seqlens.is_floating_point(),
              "lightning_attn: cu_seqlens must be a 1-D integer tensor [N+1]")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None:
        check(initial_state.shape == (N, H, K, V),
              f"lightning_attn: initial_state must be [N,H,K,V]={(N, H, K, V)}, got {tuple(initial_state.shape)}")
    scale = K ** -0.5 if scale is None else scale
    if backend(q, k, v, initial_state) == "triton":
        from kernels.lightning.chunk import chunk_lightning_triton
        return chunk_lightning_triton(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_lightning(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens)


@torch.no_grad()
def lightning_decode(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, state: Tensor,
    state_slots: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """One step: q, k [B,H,K], v [B,H,V]; state [S,H,K,V] pool (fp32, or bf16 storage) updated in
    place at rows state_slots ([B] int64, default arange(B), must be distinct). The arithmetic is
    fp32 whatever the pool stores; a bf16 pool rounds the new state once, when it is stored.
    Returns o [B,H,V] in q.dtype."""
    check(q.dim() == 3 and k.shape == q.shape, f"lightning_decode: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B,H,K]")
    B, H, K = q.shape
    check(v.dim() == 3 and v.shape[:2] == (B, H), f"lightning_decode: v must be [B,H,V] with B,H={B},{H}, got {tuple(v.shape)}")
    V = v.shape[-1]
    check(state.dim() == 4 and state.shape[1:] == (H, K, V) and state.dtype in (torch.float32, torch.bfloat16),
          f"lightning_decode: state must be fp32 or bf16 [S,{H},{K},{V}], got {state.dtype} {tuple(state.shape)}")
    check(state.is_contiguous(), "lightning_decode: state must be contiguous (it is updated in place)")
    check(g_gamma.shape == (H,), f"lightning_decode: g_gamma must be [H]={H}, got {tuple(g_gamma.shape)}")
    if state_slots is None:
        check(state.shape[0] >= B, f"lightning_decode: state has {state.shape[0]} slots < batch {B}; pass state_slots")
        state_slots = torch.arange(B, device=q.device)
    check(state_slots.shape == (B,) and not state_slots.is_floating_point(),
          f"lightning_decode: state_slots must be an integer [B]={B} tensor, got {tuple(state_slots.shape)}")
    scale = K ** -0.5 if scale is None else scale
    if backend(q, k, v, state) == "triton":
        from kernels.lightning.fused_recurrent import decode_lightning_triton
        return decode_lightning_triton(q, k, v, g_gamma, state, state_slots, scale)
    return decode_lightning(q, k, v, g_gamma, state, state_slots, scale)
