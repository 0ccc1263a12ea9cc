"""The one-pass Triton kernel behind `kernels.checksum.word_sums`: each program sums a span of
int32 words into int64 (all, odd-indexed), then the partials are added on the device."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK, ITERS = 4096, 16  # 64k words (256 KiB) per program


@triton.jit
def _word_sums(w_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    odd_lane = (lane % 2) == 1  # spans start at multiples of BLOCK (even): lane parity is word parity
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    all_sum = tl.zeros([BLOCK], dtype=tl.int64)
    odd_sum = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(ITERS):
        offs = base + i * BLOCK + lane
        w = tl.load(w_ptr + offs, mask=offs < n, other=0).to(tl.int64)
        all_sum += w
        odd_sum += tl.where(odd_lane, w, 0)
    tl.store(out_ptr + 2 * pid, tl.sum(all_sum, 0))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(odd_sum, 0))


def word_sums_triton(words: Tensor) -> Tensor:
    n = words.numel()
    programs = max(1, triton.cdiv(n, BLOCK * ITERS))
    partial = torch.empty(programs, 2, dtype=torch.int64, device=words.device)
    _word_sums[(programs,)](words, partial, n, BLOCK=BLOCK, ITERS=ITERS, num_warps=8)
    return partial.sum(0)
