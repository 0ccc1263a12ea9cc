"""The fused RoPE kernel compiled on CUDA at the bench-2b shapes (16 heads of 128, Lightning's
partial rotary of 64 dims, MLA's 64 interleaved rope dims beside 128 nope dims, kv latent 512,
decode batch 256), bit-identical to eager torch, inside a CUDA graph, without host syncs. Skipped
without CUDA. test_kernels_rope.py says why no bound is needed."""
from __future__ import annotations

import pytest
import torch

from kernels.rope import apply_rope, apply_rope_ref
from kpop.policy.config import config_from_arch
from kpop.policy.model import LightningAttention, MultiLatentAttention, Rotary
from kpop.policy.presets import bench_2b_arch
from capture import capture_without_syncs
from test_kernels_rope import assert_same_bits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
B = 256
CONFIG = config_from_arch(bench_2b_arch(), source="bench-2b")
H, D, HID = CONFIG.num_attention_heads, CONFIG.head_dim, CONFIG.hidden_size
ROT = int(CONFIG.head_dim * CONFIG.partial_rotary_factor)
NOPE, ROPE, RANK = CONFIG.qk_nope_head_dim, CONFIG.qk_rope_head_dim, CONFIG.kv_lora_rank
INTERLEAVE = CONFIG.rope_interleave


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "auto")  # CUDA tensors -> Triton


def test_bench_2b_rope_dims():
    # the shapes this file claims to cover
    assert (H, D, ROT, NOPE, ROPE, RANK, INTERLEAVE) == (16, 128, 64, 128, 64, 512, True)


def tables(n: int | tuple[int, ...], rot: int, scaling: dict | None = None):
    pos = torch.randint(0, 100_000, n if isinstance(n, tuple) else (n,), device="cuda")
    return Rotary(rot, CONFIG.rope_theta, scaling or CONFIG.rope_scaling).cuda()(pos)


def rope_cases(dtype: torch.dtype):
    """(x, cos, sin, interleaved) of every rope of a bench-2b step, as the model hands them over."""
    lin, mla = tables(B, ROT), tables(B, ROPE)
    qkv = (torch.randn(B, 3 * H, D, device="cuda") * 2).to(dtype)
    q, k, _ = qkv.chunk(3, dim=-2)  # no q/k norm: strided [B, H, D] views
    qa = (torch.randn(B, H * (NOPE + ROPE), device="cuda") * 2).to(dtype)
    _, q_rope = qa.unflatten(-1, (H, -1)).split([NOPE, ROPE], -1)
    _, k_rope = (torch.randn(B, RANK + ROPE, device="cuda") * 2).to(dtype).split([RANK, ROPE], -1)
    prefill = (torch.randn(2100, 3 * H, D, device="cuda")).to(dtype).chunk(3, dim=-2)[1]
    train = torch.randn(2, 1024, H, D, device="cuda").to(dtype)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0}
    return [
        (q.contiguous(), *lin, False), (k.contiguous(), *lin, False),  # after the q/k norm
        (q, *lin, False), (k, *lin, False),
        (q_rope, *mla, INTERLEAVE), (k_rope.unsqueeze(-2), *mla, INTERLEAVE),
        (q_rope, *mla, False),
        (prefill, *tables(2100, ROT), False),
        (train, *tables((2, 1024), ROT), False), (train, *tables((1, 1024), ROT, yarn), False),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_kernel_equals_eager_at_bench_2b_shapes(dtype):
    torch.manual_seed(0)
    for x, cos, sin, interleaved in rope_cases(dtype):
        with torch.no_grad():
            assert_same_bits(apply_rope(x, cos, sin, interleaved), apply_rope_ref(x, cos, sin, interleaved))


def test_bench_2b_layers_use_the_kernel_under_no_grad(monkeypatch):
    """A Lightning and an MLA layer of bench-2b at decode: four kernel calls under no_grad, each
    bit-identical to the reference on the tensors the layer hands it; none with autograd on."""
    import kernels.rope.rope as kr
    seen = []
    real = kr.apply_rope_triton

    def spy(x, cos, sin, interleaved=False):
        out = real(x, cos, sin, interleaved)
        assert_same_bits(out, apply_rope_ref(x, cos, sin, interleaved))
        seen.append(tuple(x.shape))
        return out

    monkeypatch.setattr(kr, "apply_rope_triton", spy)
    torch.manual_seed(0)
    lin = LightningAttention(CONFIG, 0).cuda().bfloat16()
    mla = MultiLatentAttention(CONFIG, 3).cuda().bfloat16()
    x = torch.randn(B, HID, device="cuda").bfloat16()
    lin_t, mla_t = tables(B, ROT), tables(B, ROPE)
    lin._qkv(x, *lin_t), mla._project(x, *mla_t)
    assert not seen
    with torch.no_grad():
        lin._qkv(x, *lin_t), mla._project(x, *mla_t)
    assert seen == [(B, H, D), (B, H, D), (B, H, ROPE), (B, 1, ROPE)]


def test_rope_captures_in_a_cuda_graph_without_host_syncs():
    """No device-to-host read (sync debug mode "error" raises on one), capturable (a sync inside a
    capture fails it), and a replay on new inputs equals the eager reference on them bit for bit."""
    torch.manual_seed(0)
    rot_lin = Rotary(ROT, CONFIG.rope_theta, CONFIG.rope_scaling).cuda()
    rot_mla = Rotary(ROPE, CONFIG.rope_theta, CONFIG.rope_scaling).cuda()
    pos = torch.randint(0, 100_000, (B,), device="cuda")
    qkv = torch.randn(B, 3 * H, D, device="cuda").bfloat16()
    qa = torch.randn(B, H * (NOPE + ROPE), device="cuda").bfloat16()
    kv = torch.randn(B, RANK + ROPE, device="cuda").bfloat16()

    def step(fn=apply_rope):
        q, k, _ = qkv.chunk(3, dim=-2)
        lin, mla = rot_lin(pos), rot_mla(pos)
        q_rope = qa.unflatten(-1, (H, -1))[..., NOPE:]
        k_rope = kv[:, RANK:].unsqueeze(-2)
        return (fn(q, *lin), fn(k, *lin), fn(q_rope, *mla, INTERLEAVE), fn(k_rope, *mla, INTERLEAVE))

    with torch.no_grad():
        graph, out = capture_without_syncs(step)
        for t in (qkv, qa, kv):  # new inputs, same addresses
            t.copy_(torch.randn(t.shape, device="cuda").bfloat16())
        pos.copy_(torch.randint(0, 100_000, (B,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(out, step(apply_rope_ref)):
            assert_same_bits(got, want)
