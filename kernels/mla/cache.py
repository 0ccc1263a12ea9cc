"""Triton scatter of new latent vectors into the paged MLA cache: row i goes to flat cache row
slots[i], rows with a negative slot are skipped (padding).

The torch form (naive.cache_write) drops the skipped rows with a boolean mask, whose output size
the host must read back from the device: a sync per call, two per MLA layer of a prefill step.
Here every program decides for its own rows on the device, so nothing is read back and the call
can be captured in a CUDA graph. A copy moves the same bytes either way; the result is the same
bits (a plain copy, the dtype cast done by torch beforehand).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 4096  # elements per program: 8 a thread at 4 warps
WARPS = 4


@triton.jit
def _cache_write(cache, latent, slots, N, R, D, stride_l, ROWS: tl.constexpr, BD: tl.constexpr):
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_i = i < N
    slot = tl.load(slots + i, mask=m_i, other=-1).to(tl.int64)
    # a slot past the end is skipped too: no write outside the cache (the caller's contract, see
    # kernels.mla.mla_cache_write; checking it would read the device back)
    keep = m_i & (slot >= 0) & (slot < R)
    d = tl.arange(0, BD)
    m = keep[:, None] & (d < D)[None, :]
    x = tl.load(latent + i.to(tl.int64)[:, None] * stride_l + d[None, :], mask=m)
    tl.store(cache + slot[:, None] * D + d[None, :], x, mask=m)


def launch_config(dim: int) -> tuple[int, int]:
    """(rows per program, padded row width) for cache rows of `dim` values."""
    BD = triton.next_power_of_2(dim)
    return max(1, TILE // BD), BD


def cache_write_triton(kv_cache: Tensor, latent: Tensor, slots: Tensor) -> None:
    """kv_cache [num_blocks, block_size, D] contiguous, latent [N, D] (already kv_cache's dtype),
    slots [N] integer; in place."""
    N, D = latent.shape
    if N == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    ROWS, BD = launch_config(D)
    R = kv_cache.shape[0] * kv_cache.shape[1]
    _cache_write[(triton.cdiv(N, ROWS),)](kv_cache, latent, slots.contiguous(), N, R, D, latent.stride(0),
                                          ROWS=ROWS, BD=BD, num_warps=WARPS)
