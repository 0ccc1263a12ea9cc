"""Pure-torch MLA attention: the test oracle and the CPU path.

Prefill is plain causal softmax attention per sequence with q/k head dim Dqk (nope 128 + rope 64)
and v head dim Dv. Decode is the absorbed-weight form: MQA with one latent KV head of Dk = 576
values per token (c_kv 512 + k_rope 64) whose first v_dim values are the value.
"""
from __future__ import annotations

import torch
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: Tensor | None = None, causal: bool = True) -> Tensor:
    """q, k [B,T,H,Dqk], v [B,T,H,Dv] -> o [B,T,H,Dv]. Math in fp32 (or float64 if given float64)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T = q.shape[:2]
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        spans = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    outs = []
    for b, s, e in spans:
        qs, ks, vs = (x[b, s:e].to(dt).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        att = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            L = e - s
            mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
        outs.append((att.softmax(-1) @ vs).transpose(0, 1))
    o = torch.cat(outs, 0)
    return o.reshape(B, T, *o.shape[1:]).to(q.dtype)


def cache_write(kv_cache: Tensor, latent: Tensor, slots: Tensor) -> None:
    """kv_cache [num_blocks, block_size, Dk] (contiguous) row slots[i] = latent[i], in place;
    negative slots are skipped. The boolean mask sizes its output from the data (on a GPU a host
    read-back, which the Triton kernel avoids); index_copy_ rejects slots past the end."""
    keep = slots >= 0
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slots[keep].long(), latent[keep].to(kv_cache.dtype))


def gather_latents(kv_cache: Tensor, block_table: Tensor, b: int, n: int) -> Tensor:
    """The first n cached latent vectors of sequence b, [n, Dk]."""
    bs = kv_cache.shape[1]
    pages = block_table[b, : (n + bs - 1) // bs].long()
    return kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:n]


def paged_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int) -> Tensor:
    """q [B,H,Dk] against each sequence's seq_lens[b] cached latents -> o [B,H,v_dim]."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        kv = gather_latents(kv_cache, block_table, b, n).to(dt)
        p = ((q[b].to(dt) @ kv.T) * scale).softmax(-1)
        outs.append(p @ kv[:, :v_dim])
    return torch.stack(outs).to(q.dtype)
