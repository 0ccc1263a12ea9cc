"""MLA attention for Ring-2.6's every-8th layer (DeepSeek-V2 style).

mla_prefill: causal (varlen) attention, q/k head dim nope+rope (192), v head dim 128; training
             and prefill; differentiable.
mla_decode:  absorbed-weight decode, MQA over a paged latent cache [num_blocks, block_size, 576],
             value = first v_dim (512) values of each cached vector.
mla_cache_write: scatter new latent vectors into that cache by slot (vLLM's slot_mapping
             convention: slot = block_id * block_size + offset; slot < 0 is skipped, for padding).
None of them reads the device back on CUDA (given mla_prefill's max_seqlen), so an inference
step runs ahead of the GPU. Triton on CUDA (the decode in Gluon on sm_90: decode_hopper.py), the
torch reference (naive.py) on CPU; KPOP_KERNELS overrides (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend, check
from kernels.mla.naive import attention, cache_write, paged_decode

__all__ = ["mla_prefill", "mla_decode", "mla_cache_write", "slot_mapping", "attention", "paged_decode", "cache_write"]


def mla_prefill(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None = None, causal: bool = True,
                max_seqlen: int | None = None) -> Tensor:
    """q, k [B,T,H,Dqk]; v [B,T,H,Dv]; packed varlen when cu_seqlens ([N+1] int32) is given and B == 1.

    max_seqlen: the longest sequence of cu_seqlens, from a caller that knows the lengths on the
    host (an inference engine's scheduler); it sizes the kernel's grid, which otherwise reads the
    lengths back from the device (a host sync). Contract: it must be >= the longest sequence
    (larger only launches programs that exit at once). Smaller would leave the rows past it
    unwritten: it is refused wherever checking is free (cu_seqlens in host memory); on a GPU
    checking would cost the sync it saves, so there it is the caller's word."""
    check(q.dim() == 4 and k.shape == q.shape, f"mla_prefill: q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B,T,H,Dqk]")
    check(v.dim() == 4 and v.shape[:3] == q.shape[:3], f"mla_prefill: v {tuple(v.shape)} must be [B,T,H,Dv] matching q {tuple(q.shape)}")
    check(q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype, f"mla_prefill: q/k/v need one float dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if cu_seqlens is not None:
        check(q.shape[0] == 1, f"mla_prefill: cu_seqlens needs B == 1 (packed), got B={q.shape[0]}")
        check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and not cu_seqlens.is_floating_point(),
              "mla_prefill: cu_seqlens must be a 1-D integer tensor [N+1]")
    if max_seqlen is not None:
        T = q.shape[1]
        check(isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) and 1 <= max_seqlen <= T,
              f"mla_prefill: max_seqlen must be an int in [1, T={T}], got {max_seqlen!r}")
        if cu_seqlens is None:
            check(max_seqlen == T, f"mla_prefill: without cu_seqlens every sequence has T={T} tokens, got max_seqlen={max_seqlen}")
        elif not cu_seqlens.is_cuda:  # free to check in host memory
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            check(max_seqlen >= longest, f"mla_prefill: max_seqlen={max_seqlen} is below the longest sequence ({longest})")
    if backend(q, k, v) == "triton":
        from kernels.mla.prefill import flash_attn_triton
        return flash_attn_triton(q, k, v, scale, cu_seqlens, causal, max_seqlen)
    return attention(q, k, v, scale, cu_seqlens, causal)


@torch.no_grad()
def mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int = 512) -> Tensor:
    """q [B,H,Dk]; kv_cache [num_blocks, block_size, Dk]; block_table [B, max_blocks] int32;
    seq_lens [B] int32 (>= 1, the current token included). Returns o [B,H,v_dim] in q.dtype."""
    check(q.dim() == 3, f"mla_decode: q must be [B,H,Dk], got {tuple(q.shape)}")
    B, H, Dk = q.shape
    check(kv_cache.dim() == 3 and kv_cache.shape[-1] == Dk,
          f"mla_decode: kv_cache must be [num_blocks, block_size, {Dk}], got {tuple(kv_cache.shape)}")
    check(kv_cache.dtype == q.dtype, f"mla_decode: kv_cache dtype {kv_cache.dtype} != q dtype {q.dtype}")
    check(block_table.dim() == 2 and block_table.shape[0] == B and not block_table.is_floating_point(),
          f"mla_decode: block_table must be an integer [B={B}, max_blocks] tensor, got {tuple(block_table.shape)}")
    check(seq_lens.shape == (B,) and not seq_lens.is_floating_point(), f"mla_decode: seq_lens must be an integer [B]={B} tensor")
    check(0 < v_dim <= Dk, f"mla_decode: v_dim={v_dim} must be in (0, Dk={Dk}]")
    if backend(q, kv_cache, block_table, seq_lens) == "triton":
        from kernels.mla.decode import paged_decode_triton
        return paged_decode_triton(q, kv_cache, block_table, seq_lens, scale, v_dim)
    return paged_decode(q, kv_cache, block_table, seq_lens, scale, v_dim)


def slot_mapping(block_table: Tensor, seq_ids: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """Cache slot of token `positions[i]` of sequence `seq_ids[i]`: block_table[seq, pos // bs] * bs + pos % bs."""
    blocks = block_table[seq_ids.long(), (positions // block_size).long()].long()
    return blocks * block_size + positions.long() % block_size


@torch.no_grad()
def mla_cache_write(kv_cache: Tensor, latent: Tensor, slots: Tensor) -> None:
    """Write latent [N, Dk] into kv_cache [num_blocks, block_size, Dk] at flat slots [N] (in place);
    rows with a negative slot are skipped. No host sync on CUDA (kernels/mla/cache.py). Slots must
    be distinct and below num_blocks * block_size: in host memory a slot past the end is refused;
    on a GPU (where checking would read the device back) such a row is skipped, never written
    outside the cache."""
    check(kv_cache.dim() == 3 and kv_cache.is_contiguous(), "mla_cache_write: kv_cache must be a contiguous [num_blocks, block_size, Dk] tensor")
    check(latent.dim() == 2 and latent.shape[-1] == kv_cache.shape[-1],
          f"mla_cache_write: latent must be [N, {kv_cache.shape[-1]}], got {tuple(latent.shape)}")
    check(slots.shape == latent.shape[:1], f"mla_cache_write: slots must be [N]={latent.shape[0]}, got {tuple(slots.shape)}")
    check(not slots.is_floating_point(), f"mla_cache_write: slots must be an integer tensor, got {slots.dtype}")
    rows = kv_cache.shape[0] * kv_cache.shape[1]
    if not slots.is_cuda and slots.numel():  # free to check in host memory
        top = int(slots.max())
        check(top < rows, f"mla_cache_write: slot {top} is past the cache's {rows} rows")
    if backend(kv_cache, latent, slots) == "triton":
        from kernels.mla.cache import cache_write_triton
        cache_write_triton(kv_cache, latent.to(kv_cache.dtype), slots)
        return
    cache_write(kv_cache, latent, slots)
