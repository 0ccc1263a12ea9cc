"""The fused RMSNorm kernel (kernels/norm) against the torch reference, on CPU under TRITON_INTERPRET=1.

The kernel computes the reference's arithmetic in the reference's order; only the fp32 sum of squares
is summed in another order. That moves the fp32 statistic by an ulp or two (~2^-23 relative), which
changes a 16-bit output only when the fp32 value lies that close to a rounding boundary of the
16-bit grid (spacing 2^-8 for bf16): about one element in 10^4-10^5. So 16-bit outputs must be
bit-identical except for at most 1e-3 of the elements, each off by at most one or two output ulps
(the normalised value's ulp, carried through the weight multiply). fp32 outputs carry the
statistic's difference itself: a sum of D squares in two orders differs by up to ~log2(D) * 2^-24
relative (2048 wide: ~7e-7 at worst, ~2e-7 typically), so they must agree within 16 ulps (2^-19).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.norm import rms_norm, rms_norm_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


def assert_norm_matches(out: torch.Tensor, ref: torch.Tensor, x_dtype: torch.dtype | None = None) -> None:
    """16-bit x: equal bits except for <= 1e-3 of the elements, each within 2 ulps of x's dtype (the
    normalised value is rounded to it, whatever the output dtype); fp32 x: within 16 ulps."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    a, b = out.float(), ref.float()
    x_dtype = x_dtype or out.dtype
    if x_dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=16 * ULP[torch.float32], atol=0)
        return
    differ = a != b
    assert differ.float().mean().item() <= 1e-3, f"{int(differ.sum())} of {out.numel()} elements differ"
    assert ((a - b).abs() <= 2 * ULP[x_dtype] * b.abs()).all()


def problem(shape, dtype, w_dtype=None, scale=3.0):
    x = torch.randn(shape, device=DEV) * scale
    w = torch.randn(shape[-1], device=DEV) * 0.5 + 1
    return x.to(dtype), w.to(w_dtype or dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,groups", [
    ((37, 256), 1),         # rows of a hidden-size norm
    ((5, 3, 12, 64), 1),    # [B, T, H, D] q/k norm, several rows per program
    ((9, 512), 4),          # GroupRMSNorm: 4 slices, one weight
    ((7, 96), 1),           # a width no power of two (768-wide q LoRA norm at the real size)
    ((2, 3, 5, 60), 3),     # groups of 20, a group size no power of two
    ((64,), 1),             # one row
])
def test_kernel_matches_reference(shape, groups, dtype, seed):
    x, w = problem(shape, dtype)
    with torch.no_grad():
        assert_norm_matches(rms_norm(x, w, 1e-6, groups), rms_norm_ref(x, w, 1e-6, groups))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views_of_a_fused_projection_are_read_in_place(dtype, seed):
    # the q/k of Lightning's fused qkv: [N, 3H, D] chunked along heads -> strides (3HD, D, 1)
    qkv = torch.randn(6, 3 * 4, 64, device=DEV).to(dtype)
    w = (torch.rand(64, device=DEV) + 0.5).to(dtype)
    for part in qkv.chunk(3, dim=-2):
        assert not part.is_contiguous()
        with torch.no_grad():
            assert_norm_matches(rms_norm(part, w, 1e-6), rms_norm_ref(part, w, 1e-6))
    # MLA's latent split off its rope part: [N, rank] rows with a longer stride
    c_kv, _ = torch.randn(5, 2, 96 + 32, device=DEV).to(dtype).split([96, 32], dim=-1)
    w = (torch.rand(96, device=DEV) + 0.5).to(dtype)
    with torch.no_grad():
        assert_norm_matches(rms_norm(c_kv, w, 1e-6), rms_norm_ref(c_kv, w, 1e-6))
    # leading dims that cannot merge into one view (a transpose): copied once, same result
    t = torch.randn(4, 6, 3, 32, device=DEV).to(dtype).transpose(0, 1)
    w = (torch.rand(32, device=DEV) + 0.5).to(dtype)
    with torch.no_grad():
        assert_norm_matches(rms_norm(t, w, 1e-6), rms_norm_ref(t, w, 1e-6))


def test_output_dtype_promotes_as_the_weight_multiply_does(seed):
    # bf16 activations with an fp32 weight (a model not cast whole): the product is fp32
    x, w = problem((11, 128), torch.bfloat16, torch.float32)
    with torch.no_grad():
        out, ref = rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    assert out.dtype == torch.float32
    assert_norm_matches(out, ref, x_dtype=torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf * 0
def test_rounding_ties_nan_inf_and_empty_input():
    # an output exactly halfway between two bf16 numbers rounds to even, as torch does (Triton's
    # interpreter truncates a bf16 cast, so this fails without the kernel's own rounding):
    # x = a = 0.5 + 2^-8 and eps = 1 - a^2 make mean + eps exactly 1, so the normalised value is a;
    # a * 1.5 = 0.75 + 3 * 2^-9 lies halfway between 0.75 + 2^-8 and 0.75 + 2^-7 (the even one)
    a = 0.5 + 2**-8
    x = torch.full((3, 2), a, device=DEV).bfloat16()
    w = torch.full((2,), 1.5, device=DEV).bfloat16()
    eps = 1 - a * a
    with torch.no_grad():
        out, ref = rms_norm(x, w, eps), rms_norm_ref(x, w, eps)
    assert (ref.float() == 0.75 + 2**-7).all()
    assert torch.equal(out, ref)
    x = torch.randn(4, 32, device=DEV).bfloat16()
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    w = torch.ones(32, device=DEV).bfloat16()
    with torch.no_grad():
        out, ref = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert torch.equal(out.isnan(), ref.isnan())  # NaN spreads over its row, as in torch
    assert torch.equal(out[[0, 3]], ref[[0, 3]])
    with torch.no_grad():
        assert rms_norm(torch.empty(0, 32, device=DEV).bfloat16(), w, 1e-6).shape == (0, 32)


def test_bad_weight_or_groups_are_named():
    x = torch.randn(3, 32, device=DEV)
    with pytest.raises(ValueError, match=r"weight must be \[D=32\]"):
        rms_norm(x, torch.ones(16, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="groups=5 must divide the last dim 32"):
        rms_norm(x, torch.ones(32, device=DEV), 1e-6, groups=5)


def test_autograd_on_keeps_the_reference_and_its_gradient(seed):
    x, w = problem((6, 64), torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    out = rms_norm(x, w, 1e-6)
    assert out.grad_fn is not None  # the reference ran (the kernel has no backward)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_model_norms_use_the_kernel_under_no_grad(monkeypatch, seed):
    """The model's RMSNorm / GroupRMSNorm: eager (autograd on) vs the kernel (no_grad), bf16."""
    from kpop.policy.model import GroupRMSNorm, RMSNorm

    calls = []
    import kernels.norm.rmsnorm as kn
    real = kn.rms_norm_triton
    monkeypatch.setattr(kn, "rms_norm_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    for norm, x in ((RMSNorm(128, 1e-6), torch.randn(9, 128)), (GroupRMSNorm(256, 4, 1e-6), torch.randn(2, 5, 256))):
        norm = norm.to(DEV, torch.bfloat16)
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
        x = x.to(DEV, torch.bfloat16) * 2
        eager = norm(x)
        assert eager.grad_fn is not None and not calls
        with torch.no_grad():
            fused = norm(x)
        assert calls
        calls.clear()
        assert_norm_matches(fused, eager.detach())
