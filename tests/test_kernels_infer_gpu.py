"""The inference kernels (fused RMSNorm, fp32-output LM head, fused router) compiled on CUDA at the bench-2b shapes
(hidden 2048, 16 heads of 128, q LoRA 768, kv latent 512 + 64, vocab 32,000, decode batch 256) and at
Ring-2.6's 157,184-token vocabulary, inside a CUDA graph, without host syncs. Skipped without CUDA.
The CPU-interpreter tests (test_kernels_norm.py, test_kernels_linear.py, test_kernels_router.py)
explain the bounds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import linear_fp32
from kernels.norm import rms_norm, rms_norm_ref
from kernels.router import route, route_ref
from capture import capture_without_syncs
from numerics import relerr
from test_kernels_norm import assert_norm_matches
from test_kernels_router import tie_free

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
B, HID, H, D = 256, 2048, 16, 128


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "auto")  # CUDA tensors -> Triton


def _w(n: int, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(n, device="cuda") * 0.3 + 1).to(dtype)


def norm_cases():
    """(x, weight, groups) of every norm of a bench-2b decode step, as the model hands them over."""
    qkv = torch.randn(B, 3 * H, D, device="cuda").bfloat16() * 2
    q, k, _ = qkv.chunk(3, dim=-2)  # Lightning's q/k norm: strided [B, H, D] views
    c_kv, _ = (torch.randn(B, 512 + 64, device="cuda").bfloat16() * 3).split([512, 64], dim=-1)  # MLA latent
    return [
        (torch.randn(B, HID, device="cuda").bfloat16() * 4, _w(HID), 1),  # pre-norms, final norm
        (q, _w(D), 1), (k, _w(D), 1),
        (torch.randn(B, H * D, device="cuda").bfloat16(), _w(H * D), 4),  # Lightning's group norm
        (torch.randn(B, 768, device="cuda").bfloat16(), _w(768), 1),  # MLA q LoRA norm
        (c_kv, _w(512), 1),
        (torch.randn(3, 700, HID, device="cuda").bfloat16(), _w(HID), 1),  # prefill rows
        (torch.randn(B, HID, device="cuda") * 4, _w(HID, torch.float32), 1),  # an fp32 model
    ]


def test_norm_kernel_matches_eager_at_bench_2b_shapes():
    torch.manual_seed(0)
    for x, w, groups in norm_cases():
        with torch.no_grad():
            assert_norm_matches(rms_norm(x, w, 1e-6, groups), rms_norm_ref(x, w, 1e-6, groups), x.dtype)


@pytest.mark.parametrize("vocab,w_dtype", [(32000, torch.float32), (32000, torch.bfloat16), (157184, torch.float32)])
@pytest.mark.parametrize("M", [1, 7, 64, 256, 2500])
def test_lm_head_kernel_equals_the_fp32_head(vocab, w_dtype, M):
    torch.manual_seed(0)
    if vocab > 32000 and M not in (1, 256):
        pytest.skip("the large vocabulary at the decode sizes only")
    w = (torch.randn(vocab, HID, device="cuda") * HID**-0.5).to(w_dtype)
    h = torch.randn(M, HID, device="cuda").bfloat16()
    with torch.no_grad():
        got = linear_fp32(h, w)
    want = F.linear(h.double(), w.double())
    assert got.dtype == torch.float32 and got.shape == (M, vocab)
    # the fp32 GEMM up to summation order: no further from the fp64 product than a few times
    # cuBLAS's own fp32 GEMM on this device (a dropped third bf16 piece of an fp32 weight would
    # add ~1e-5). An absolute 2e-6 bound, right on CPU, failed every case on an H100.
    fp32_err = relerr(F.linear(h.float(), w.float()), want)
    assert relerr(got, want) < 4 * max(fp32_err, 1e-6), (relerr(got, want), fp32_err)


def test_kernels_capture_in_a_cuda_graph_without_host_syncs():
    """No device-to-host read (sync debug mode "error" raises on one), capturable (a sync inside a
    capture fails it), and a replay on new inputs equals the eager call on them bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(B, HID, device="cuda").bfloat16()
    nw = _w(HID)
    head = torch.randn(32000, HID, device="cuda") * HID**-0.5

    gate = torch.randn(32, HID, device="cuda") * HID**-0.5
    bias = torch.randn(32, device="cuda") * 0.05

    def step():
        h = rms_norm(x, nw, 1e-6)
        ids, w = route(F.linear(h.float(), gate), bias, 8, 4, 8, 2.5)
        return linear_fp32(h, head), ids, w

    with torch.no_grad():
        graph, out = capture_without_syncs(step)
        x.copy_(torch.randn(B, HID, device="cuda").bfloat16())  # new inputs, same address
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    assert relerr(out[0], F.linear(rms_norm_ref(x, nw, 1e-6).double(), head.double())) < 1e-4


@pytest.mark.parametrize("N,E,G,TG,k", [(256, 32, 8, 4, 8), (2048, 32, 8, 4, 8), (256, 256, 8, 4, 8), (37, 48, 3, 2, 5)])
def test_router_kernel_chooses_torchs_experts(N, E, G, TG, k):
    """bench-2b's router (32 experts, 8 groups, top-4 groups, top-8) at decode and prefill sizes,
    Ring-2.6-1T's (256 experts): torch's ids in torch's order on tie-free inputs, weights within
    a few ulps (the k-term sum's order)."""
    torch.manual_seed(0)
    logits, bias = tie_free(N, E, G)
    with torch.no_grad():
        ids, w = route(logits, bias, G, TG, k, 2.5)
    ref_ids, ref_w = route_ref(logits, bias, G, TG, k, 2.5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)


def test_router_sigmoid_is_torchs_bit_for_bit():
    """Top-1 with scaling 1: the weight is the sigmoid score itself, which the kernel computes as
    torch's CUDA sigmoid does (libdevice expf, an IEEE division)."""
    torch.manual_seed(0)
    logits, bias = tie_free(4096, 32, 8, scale=6.0)
    with torch.no_grad():
        ids, w = route(logits, bias, 8, 4, 1, 1.0)
    assert torch.equal(w, torch.sigmoid(logits).gather(1, ids)), "the kernel's sigmoid differs from torch's"
