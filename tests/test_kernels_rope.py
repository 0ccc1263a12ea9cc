"""The fused RoPE kernel (kernels/rope) against the torch reference, on CPU under TRITON_INTERPRET=1.

No bound: the kernel must be bit-identical for bf16, fp16 and fp32. Every value it computes is one
the reference computes with the same IEEE operation: cos/sin rounded to x's dtype, each product
(exact in fp32 for 16-bit operands, so rounding it once is torch's 16-bit multiply) rounded, the
sum of the two rounded products rounded; fp32 runs the same single-rounding ops with no FMA. The
pass-through dims are copied. Comparisons treat NaN as equal to NaN only where both have one.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.rope import apply_rope, apply_rope_ref  # noqa: E402
from kpop.policy.model import Rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 1.0}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out.isnan(), ref.isnan())
    same = (out == ref) | out.isnan()
    bad = ~same
    assert same.all(), f"{int(bad.sum())} of {out.numel()} elements differ, e.g. {out[bad][:4]} vs {ref[bad][:4]}"
    # equal as numbers is not enough: -0.0 == 0.0, so compare the signs of zeros too
    assert torch.equal(torch.signbit(out), torch.signbit(ref)) or out.isnan().any()


def tables(positions: torch.Tensor, rot: int, scaling: dict | None = None, base: float = 10000.0):
    """The model's own cos/sin (fp32) for integer positions."""
    return Rotary(rot, base, scaling).to(positions.device)(positions)


def check(x, cos, sin, interleaved=False):
    with torch.no_grad():
        out, ref = apply_rope(x, cos, sin, interleaved), apply_rope_ref(x, cos, sin, interleaved)
    assert_same_bits(out, ref)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, YARN], ids=["default", "yarn"])
def test_lightning_partial_rotary(dtype, scaling, seed):
    """[N, H, D] decode rows and [B, T, H, D] training rows, the first D/2 dims rotated, positions
    up to 100k (angles of 1e5 rad: the tables' values are whatever fp32 cos/sin give there)."""
    N, H, D = 37, 4, 64
    pos = torch.randint(0, 100_000, (N,), device=DEV)
    cos, sin = tables(pos, D // 2, scaling)
    check((torch.randn(N, H, D, device=DEV) * 3).to(dtype), cos, sin)
    pos = torch.randint(0, 100_000, (2, 9), device=DEV)
    cos, sin = tables(pos, D // 2, scaling)
    check((torch.randn(2, 9, H, D, device=DEV) * 3).to(dtype), cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_strided_views_of_the_fused_qkv_are_read_in_place(dtype, seed):
    # without the q/k norm the rope takes the chunks of [N, 3H, D] itself: strides (3HD, D, 1)
    N, H, D = 11, 4, 64
    qkv = (torch.randn(N, 3 * H * D, device=DEV) * 2).to(dtype).unflatten(-1, (3 * H, D))
    cos, sin = tables(torch.randint(0, 100_000, (N,), device=DEV), D // 2)
    for part in qkv.chunk(3, dim=-2)[:2]:
        assert not part.is_contiguous()
        check(part, cos, sin)
    # training rows [B, T, 3H, D] chunked, and cos of one batch row broadcast over B
    qkv = (torch.randn(3, 5, 3 * H, D, device=DEV)).to(dtype)
    cos, sin = tables(torch.arange(90_000, 90_005, device=DEV)[None], D // 2)
    check(qkv.chunk(3, dim=-2)[1], cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_mla_rope_dims(dtype, interleaved, seed):
    """MLA: q_rope the last 64 of each head's 192 (a split view of the q projection), k_rope the
    last 64 of the 576-wide latent projection with a unit head dim unsqueezed; all dims rotated."""
    N, H, nope, rope, rank = 13, 4, 128, 64, 512
    pos = torch.randint(0, 100_000, (N,), device=DEV)
    cos, sin = tables(pos, rope, YARN)
    q = (torch.randn(N, H * (nope + rope), device=DEV) * 2).to(dtype)
    _, q_rope = q.unflatten(-1, (H, -1)).split([nope, rope], dim=-1)
    _, k_rope = (torch.randn(N, rank + rope, device=DEV) * 2).to(dtype).split([rank, rope], dim=-1)
    assert not q_rope.is_contiguous() and not k_rope.is_contiguous()
    check(q_rope, cos, sin, interleaved)
    out = check(k_rope.unsqueeze(-2), cos, sin, interleaved)
    assert out.shape == (N, 1, rope)
    # prefill-shaped rows [1, T, H, rope]
    pos = torch.randint(0, 100_000, (1, 6), device=DEV)
    cos, sin = tables(pos, rope)
    check((torch.randn(1, 6, H, rope, device=DEV)).to(dtype), cos, sin, interleaved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot,D,interleaved", [
    (24, 52, False), (24, 52, True), (6, 6, True), (2, 8, False), (0, 8, False),
])
def test_widths_no_power_of_two(rot, D, interleaved, dtype, seed):
    # halves of 12 and 3, a 28-wide pass-through, a single pair, nothing rotated at all
    cos, sin = tables(torch.randint(0, 100_000, (3, 5), device=DEV), rot)
    check((torch.randn(3, 5, 7, D, device=DEV) * 4).to(dtype), cos, sin, interleaved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permuted_layouts_and_tables_with_their_own_strides(dtype, seed):
    # a transposed batch [T, B, H, D] seen as [B, T, H, D]: two leading dims, read in place
    x = torch.randn(6, 4, 3, 32, device=DEV).to(dtype).transpose(0, 1)
    base = torch.randint(0, 100_000, (4, 6), device=DEV)
    cos, _ = tables(base, 16)
    _, sin = tables(base.t().contiguous(), 16)
    sin = sin.transpose(0, 1)  # sin with other strides than cos
    assert cos.stride() != sin.stride()
    check(x, cos, sin)
    # three leading dims reversed: no two strides index them, so the kernel reads a copy
    x = torch.randn(4, 3, 2, 3, 32, device=DEV).to(dtype).permute(2, 1, 0, 3, 4)
    cos, sin = tables(torch.randint(0, 100_000, (3, 4), device=DEV), 16)
    check(x, cos, sin)
    # a strided last dim (every other element), and tables that are views of wider ones
    x = torch.randn(5, 3, 64, device=DEV).to(dtype)[..., ::2]
    cos, sin = tables(torch.randint(0, 100_000, (5,), device=DEV), 48)
    check(x, cos[:, ::3][:, :16].contiguous(), sin[:, 1::3][:, :16])
    # one cos row broadcast to every token: stride 0
    cos, sin = tables(torch.tensor([77_777], device=DEV), 16)
    check(torch.randn(9, 2, 32, device=DEV).to(dtype), cos, sin)


@pytest.mark.parametrize("x_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_tables_of_another_dtype_are_rounded_to_xs_first(x_dtype, t_dtype, seed):
    cos, sin = tables(torch.randint(0, 100_000, (8,), device=DEV), 32, YARN)
    check((torch.randn(8, 3, 48, device=DEV) * 2).to(x_dtype), cos.to(t_dtype), sin.to(t_dtype))


def test_rounding_ties_go_to_even_as_torch_does():
    """Triton's CPU interpreter truncates a bf16 cast, so this fails without the kernel's own
    rounding. cos = 1 + 3 * 2^-8 lies halfway between the bf16 neighbours 1 + 2^-7 and 1 + 2^-6
    (the even one); x1 * cos with x1 = 1 + 2^-7 is 1 + 5 * 2^-8 + 3 * 2^-15, rounded up; and with
    sin 0 the sum is the product."""
    x = torch.tensor([[[1 + 2**-7, 1.0]]], device=DEV).bfloat16()
    cos = torch.full((1, 2), 1 + 3 * 2**-8, device=DEV)
    sin = torch.zeros(1, 2, device=DEV)
    out = check(x, cos, sin)
    assert out[0, 0, 1].item() == 1 + 2**-6  # x2 * round(cos)
    assert out[0, 0, 0].item() == 1 + 3 * 2**-7


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf * 0
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_overflow_signed_zero_and_empty_input(dtype):
    cos, sin = tables(torch.arange(4, device=DEV) * 25_000, 8)
    x = torch.randn(4, 2, 12, device=DEV).to(dtype)
    x[0, 0, 1], x[1, 1, 5], x[2, 0, 10], x[3, 1, 0] = float("nan"), float("inf"), float("nan"), -float("inf")
    x[2, 1, :] = -0.0
    check(x, cos, sin)
    check(x, cos, sin, interleaved=True)
    big = torch.finfo(dtype).max
    x = torch.full((2, 1, 4), big, device=DEV).to(dtype)  # the sum overflows to inf, as in torch
    check(x, torch.full((2, 4), 0.75, device=DEV), torch.full((2, 4), 0.75, device=DEV))
    with torch.no_grad():
        assert apply_rope(torch.empty(0, 2, 12, device=DEV).to(dtype), cos[:0], sin[:0]).shape == (0, 2, 12)


def test_bad_shapes_are_named():
    x = torch.randn(3, 2, 16, device=DEV)
    cos = torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H, D\]"):
        apply_rope(torch.randn(16, device=DEV), cos, cos)
    with pytest.raises(ValueError, match="cos and sin must be"):
        apply_rope(x, cos, cos[:, :4])
    with pytest.raises(ValueError, match="rotated width 7 must be even"):
        apply_rope(x, cos[:, :7], cos[:, :7])
    with pytest.raises(ValueError, match="rotated width 18 must be even and at most the head dim 16"):
        apply_rope(x, torch.randn(3, 18, device=DEV), torch.randn(3, 18, device=DEV))
    with pytest.raises(ValueError, match=r"do not broadcast to x's leading dims \(3,\)"):
        apply_rope(x, torch.randn(4, 8, device=DEV), torch.randn(4, 8, device=DEV))
    with pytest.raises(ValueError, match=r"do not broadcast"):  # would grow x's shape
        apply_rope(x, torch.randn(2, 3, 8, device=DEV), torch.randn(2, 3, 8, device=DEV))


def test_autograd_on_keeps_the_reference_and_its_gradient(monkeypatch, seed):
    import kernels.rope.rope as kr
    calls = []
    real = kr.apply_rope_triton
    monkeypatch.setattr(kr, "apply_rope_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 2, 16, device=DEV, requires_grad=True)
    cos, sin = tables(torch.arange(5, device=DEV), 8)
    out = apply_rope(x, cos, sin)
    assert out.grad_fn is not None and not calls  # the reference ran (the kernel has no backward)
    assert torch.equal(out, apply_rope_ref(x, cos, sin))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("qk_norm,interleave", [(True, True), (False, False)])
def test_model_rope_uses_the_kernel_under_no_grad(monkeypatch, qk_norm, interleave, seed):
    """The model's Lightning q/k (normed, or the strided chunks of the fused projection) and MLA
    q_rope / k_rope, bf16: under no_grad every apply_rope is the kernel, on exactly the tensors the
    reference gets; with autograd on none is."""
    from kpop.policy.config import config_from_arch
    from kpop.policy.model import BailingHybridModel, LightningAttention, MultiLatentAttention
    from kpop.policy.presets import tiny_arch

    import kernels.rope.rope as kr
    seen = []
    real = kr.apply_rope_triton

    def spy(x, cos, sin, interleaved=False):
        out = real(x, cos, sin, interleaved)
        assert_same_bits(out, apply_rope_ref(x, cos, sin, interleaved))
        seen.append((x.is_contiguous(), tuple(x.shape), interleaved))
        return out

    monkeypatch.setattr(kr, "apply_rope_triton", spy)
    monkeypatch.setenv("KPOP_KERNELS", "torch")  # the norms stay eager: only the rope is under test
    import kernels.rope as rope_pkg
    monkeypatch.setattr(rope_pkg, "backend", lambda *t: "triton")
    config = config_from_arch(tiny_arch(use_qk_norm=qk_norm, rope_interleave=interleave, rope_scaling=YARN))
    model = BailingHybridModel(config).to(DEV, torch.bfloat16)
    lin = next(m for m in model.modules() if isinstance(m, LightningAttention))
    mla = next(m for m in model.modules() if isinstance(m, MultiLatentAttention))
    x = torch.randn(7, config.hidden_size, device=DEV).bfloat16()
    rope = model.rope(torch.randint(0, 100_000, (7,), device=DEV))
    eager = lin._qkv(x, *rope["linear"]), mla._project(x, *rope["mla"])
    assert not seen
    with torch.no_grad():
        fused = lin._qkv(x, *rope["linear"]), mla._project(x, *rope["mla"])
    H, D, r = config.num_attention_heads, config.head_dim, config.qk_rope_head_dim
    assert seen == [(qk_norm, (7, H, D), False), (qk_norm, (7, H, D), False),
                    (False, (7, H, r), interleave), (False, (7, 1, r), interleave)]
    for a, b in zip((*fused[0], *fused[1]), (*eager[0], *eager[1])):
        assert torch.equal(a, b.detach())
