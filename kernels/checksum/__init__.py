"""Checksums of weight-sync buckets (kpop/weight_sync/buckets.py).

    word_sums(buf) -> int64 [2]: the sums of `buf` read as int32 words, of all of them and of the
    odd-indexed ones (so two swapped neighbours show), on buf's device.

Integer sums wrap mod 2^64 whatever the order of the additions, so the Triton kernel (one pass
over the buffer at memory speed; torch's two reductions read it twice, the strided one slowly)
and the torch reference agree bit for bit: a bucket sealed on one device verifies on another.
Triton on CUDA, the reference otherwise; KPOP_KERNELS overrides (kernels/_dispatch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import backend, check

__all__ = ["word_sums", "word_sums_reference"]


def word_sums_reference(words: Tensor) -> Tensor:
    return torch.stack([words.sum(dtype=torch.int64), words[1::2].sum(dtype=torch.int64)])


def word_sums(buf: Tensor) -> Tensor:
    """`buf`: a contiguous 1-D buffer whose size is a multiple of 4 bytes (any dtype)."""
    check(buf.dim() == 1 and buf.is_contiguous(), f"word_sums: needs a contiguous 1-D buffer, got {tuple(buf.shape)}")
    check(buf.numel() * buf.element_size() % 4 == 0, f"word_sums: {buf.numel() * buf.element_size()} bytes are not int32 words")
    words = buf.view(torch.uint8).view(torch.int32)
    if backend(words) == "triton":
        from kernels.checksum.sums import word_sums_triton

        return word_sums_triton(words)
    return word_sums_reference(words)
