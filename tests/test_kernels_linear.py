"""The fp32-output GEMM (kernels/linear, the LM head) against the fp32 GEMM, on CPU under
TRITON_INTERPRET=1 (on a CUDA machine the same tests run the compiled kernel).

16-bit x 16-bit products are exact in fp32, so the kernel and F.linear(x.float(), w.float()) sum the
same fp32 numbers in different orders: relative errors ~1e-7 against a float64 oracle here (the fp32
GEMM's own ~2e-7), so the bound is 1e-6. That bound also proves an fp32 w is split into all three
bf16 pieces: rounding w to bf16 gives ~2e-3, dropping the third piece ~1e-5. Each launch config
(M <= 64, M <= 512, larger M) is run, with a K that is no multiple of the K tile.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.linear import linear_fp32, linear_fp32_ref  # noqa: E402
from kernels.linear.gemm import launch_config  # noqa: E402
from numerics import relerr  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-6


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


@pytest.mark.parametrize("dtype,w_dtype", [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # the fp32 head of a bf16 model: w split into three bf16 pieces
])
@pytest.mark.parametrize("M,N,K", [(1, 200, 128), (37, 130, 96), (64, 256, 64), (70, 300, 160), (513, 260, 64)])
def test_kernel_equals_the_fp32_gemm(M, N, K, dtype, w_dtype, seed):
    x = torch.randn(M, K, device=DEV).to(dtype)
    # an fp32 w uses all 24 significand bits: rounding it to bf16 alone would be off by ~1e-3
    w = (torch.randn(N, K, device=DEV) * K**-0.5).to(w_dtype)
    with torch.no_grad():
        out = linear_fp32(x, w)
    want = F.linear(x.float(), w.float())
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert relerr(out, want) < TOL
    assert relerr(out, x.double() @ w.double().T) < TOL


def test_each_regime_has_its_own_tiles():
    # the three regimes above really take three configs (the decode ones cover M with few row tiles)
    for w_dtype in (torch.bfloat16, torch.float32):
        small, decode, prefill = (launch_config(m, w_dtype) for m in (37, 256, 4096))
        assert small[0] == 64 and decode[0] == 128 and len({small, decode}) == 2
        assert launch_config(1, w_dtype)[0] == 16  # the smallest tile tl.dot takes
    assert launch_config(4096) != launch_config(256)


def test_strided_and_batched_inputs(seed):
    # [B, T, K] hidden states, and the last position of each row (a strided view, read in place)
    h = torch.randn(3, 7, 64, device=DEV).bfloat16()
    w = torch.randn(90, 64, device=DEV).bfloat16() * 0.125
    with torch.no_grad():
        full, last = linear_fp32(h, w), linear_fp32(h[:, -1], w)
    assert full.shape == (3, 7, 90) and last.shape == (3, 90)
    assert relerr(full, linear_fp32_ref(h, w)) < TOL
    assert relerr(last, linear_fp32_ref(h[:, -1], w)) < TOL
    with torch.no_grad():
        assert linear_fp32(h[:0], w).shape == (0, 7, 90)


def test_autograd_fp32_and_mixed_dtypes_keep_the_reference(seed):
    x = torch.randn(5, 32, device=DEV).bfloat16().requires_grad_()
    w = torch.randn(40, 32, device=DEV).bfloat16().requires_grad_()
    out = linear_fp32(x, w)  # training: differentiable, the fp32 GEMM itself
    assert out.grad_fn is not None and torch.equal(out, linear_fp32_ref(x, w))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        a, b = torch.randn(5, 32, device=DEV), torch.randn(40, 32, device=DEV)
        assert torch.equal(linear_fp32(a, b), F.linear(a, b))  # fp32 x: the fp32 GEMM
        assert torch.equal(linear_fp32(a.half(), b), F.linear(a.half().float(), b))  # fp16 x, fp32 w


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"must share K, got \(4, 32\) and \(10, 16\)"):
        linear_fp32(torch.randn(4, 32, device=DEV), torch.randn(10, 16, device=DEV))


def test_model_lm_head_uses_the_kernel_under_no_grad(monkeypatch, seed):
    """A bf16 model keeps its LM head weight in fp32 (kpop.policy.checkpoint.set_dtype): the split path."""
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config

    import kernels.linear.gemm as kg

    calls = []
    real = kg.linear_fp32_triton
    monkeypatch.setattr(kg, "linear_fp32_triton", lambda *a: calls.append(1) or real(*a))
    model = build_model(tiny_config(300), seed=0, device=DEV, dtype="bfloat16").eval()
    assert model.lm_head.weight.dtype == torch.float32
    h = torch.randn(2, 9, model.config.hidden_size, device=DEV).bfloat16()
    want = model.logits(h)  # autograd on: the fp32 head
    assert want.grad_fn is not None and not calls
    with torch.no_grad():
        got = model.logits(h)
    assert calls and got.dtype == torch.float32
    assert relerr(got, want.detach()) < TOL

