"""The bucket checksum's Triton kernel equals its torch reference bit for bit (CPU: under
TRITON_INTERPRET=1; on a CUDA machine the compiled kernel)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.checksum import word_sums, word_sums_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("words", [1, 2, 4095, 4096 * 16 + 3, 3 * 4096 * 16])
def test_triton_word_sums_equal_the_reference(monkeypatch, words):
    g = torch.Generator().manual_seed(words)
    w = torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, generator=g).to(DEV)
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    got = word_sums(w.view(torch.uint8))
    monkeypatch.setenv("KPOP_KERNELS", "torch")
    assert torch.equal(got.cpu(), word_sums(w.view(torch.uint8)).cpu())
    assert torch.equal(got.cpu(), word_sums_reference(w.cpu()))


def test_swapped_neighbours_change_the_odd_sum(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    w = torch.arange(1, 9, dtype=torch.int32, device=DEV)
    swapped = w.clone()
    swapped[[2, 3]] = swapped[[3, 2]]
    a, b = word_sums(w), word_sums(swapped)
    assert a[0] == b[0] and a[1] != b[1]


def test_a_buffer_that_is_not_whole_words_is_named():
    with pytest.raises(ValueError, match="not int32 words"):
        word_sums(torch.zeros(6, dtype=torch.uint8))
