"""Compiled Triton kernels at real Ring-2.6 shapes, bf16 vs an fp32 reference (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from kernels.lightning import chunk_lightning, decode_lightning, lightning_attn, lightning_decode
from kernels.mla import attention, mla_decode, mla_prefill, paged_decode
from numerics import relerr  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16_TOL = 1e-2


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "auto")  # CUDA tensors -> Triton


def _ring_g(H: int) -> torch.Tensor:
    start = 2 ** (-8 / H)
    return -torch.tensor([start ** (h + 1) for h in range(H)], device="cuda") * 0.5


def test_lightning_real_shape_varlen_fwd_bwd():
    torch.manual_seed(0)
    H, D = 16, 128
    cu = torch.tensor([0, 1000, 1001, 3000], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, 3000, H, D, device="cuda", dtype=torch.bfloat16) * 0.5 for _ in range(3))
    h0 = torch.randn(3, H, D, D, device="cuda") * 0.1
    g = _ring_g(H)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, h0)]
    o, ht = lightning_attn(*leaves[:3], g, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht) * 0.01
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    refs = [x.detach().float().requires_grad_() for x in (q, k, v, h0)]
    o_r, ht_r = chunk_lightning(*refs[:3], g, D ** -0.5, refs[3], True, cu)
    ((o_r * do.float()).sum() + (ht_r * dht).sum()).backward()
    assert relerr(o, o_r) < BF16_TOL and relerr(ht, ht_r) < BF16_TOL
    for a, b in zip(leaves, refs):
        assert relerr(a.grad, b.grad) < BF16_TOL


def test_lightning_decode_real_shape():
    B, H, D = 64, 64, 128
    q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pool = torch.randn(2 * B, H, D, D, device="cuda")
    ref_pool = pool.clone()
    slots = torch.randperm(2 * B, device="cuda")[:B]
    o = lightning_decode(q, k, v, _ring_g(H), pool, slots)
    o_r = decode_lightning(q, k, v, _ring_g(H), ref_pool, slots, D ** -0.5)
    assert relerr(o, o_r) < BF16_TOL and relerr(pool, ref_pool) < 1e-6


def test_mla_prefill_real_shape_varlen_fwd_bwd():
    torch.manual_seed(0)
    H = 16
    cu = torch.tensor([0, 1500, 1501, 4000], dtype=torch.int32, device="cuda")
    q, k = (torch.randn(1, 4000, H, 192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 4000, H, 128, device="cuda", dtype=torch.bfloat16)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = mla_prefill(*leaves, 192 ** -0.5, cu)
    do = torch.randn_like(o)
    (o.float() * do).sum().backward()
    refs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o_r = attention(*refs, 192 ** -0.5, cu)
    (o_r * do.float()).sum().backward()
    assert relerr(o, o_r) < BF16_TOL
    for a, b in zip(leaves, refs):
        assert relerr(a.grad, b.grad) < BF16_TOL


def test_mla_decode_real_shape():
    B, H, Dk, page = 16, 64, 576, 64
    lens = torch.randint(1, 4097, (B,), device="cuda", dtype=torch.int32)
    nb = 4096 // page
    cache = torch.randn(B * nb, page, Dk, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(B * nb, device="cuda").reshape(B, nb).int()
    q = torch.randn(B, H, Dk, device="cuda", dtype=torch.bfloat16)
    o = mla_decode(q, cache, table, lens, Dk ** -0.5, 512)
    assert relerr(o, paged_decode(q.float(), cache.float(), table, lens, Dk ** -0.5, 512)) < BF16_TOL


def _hopper_gluon() -> bool:
    from kernels.mla import decode_hopper
    return decode_hopper.HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("H,lens,page,dtype,splits", [
    (64, [1, 63, 64, 65, 777, 4096], 64, torch.bfloat16, None),  # ragged ends inside a tile, one token
    (64, [1, 63, 64, 65, 777, 4096], 64, torch.bfloat16, 7),     # empty KV splits weigh nothing
    (16, [5, 100, 1000, 3000], 64, torch.bfloat16, 1),           # fewer heads than a 64-row block
    (128, [70, 640, 2049], 128, torch.float16, 3),              # two head blocks, 128-token pages
])
def test_mla_decode_kernels_match_reference(kernel, H, lens, page, dtype, splits):
    """Both decode kernels at Ring-2.6's latent width (576 = 512 + 64). The cache rows past each
    sequence's end hold large finite values: the Gluon kernel loads whole tiles and must weigh them 0."""
    from kernels.mla.decode import paged_decode_triton

    if kernel == "gluon" and not _hopper_gluon():
        pytest.skip("the Gluon MLA decode needs sm_90 and triton.experimental.gluon")
    torch.manual_seed(0)
    B = len(lens)
    nb = (max(lens) + page - 1) // page + 1
    cache = torch.randn(B * nb + 3, page, 576, device="cuda", dtype=dtype) * 100
    table = torch.randperm(B * nb + 3, device="cuda")[: B * nb].reshape(B, nb).int()
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, 576, device="cuda", dtype=dtype) * 0.01
    o = paged_decode_triton(q, cache, table, seq_lens, 576 ** -0.5, 512, num_splits=splits, kernel=kernel)
    ref = paged_decode(q.float(), cache.float(), table, seq_lens, 576 ** -0.5, 512)
    assert o.shape == (B, H, 512) and o.dtype == dtype
    assert relerr(o, ref) < BF16_TOL


def test_mla_decode_picks_gluon_on_hopper():
    from kernels.mla import decode_hopper

    q = torch.zeros(2, 64, 576, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 576, device="cuda", dtype=torch.bfloat16)
    assert decode_hopper.supported(q, cache, 512) == _hopper_gluon()
    assert not decode_hopper.supported(q, cache, 256)  # value width other than the latent
    assert not decode_hopper.supported(q, cache[:, :16], 512)  # 16-token pages: a tile would straddle pages


def _moe_problem(N, D, I, E, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", dtype=dtype, generator=g)
    logits = torch.randn(N, E, device="cuda", generator=g)
    ids = logits.topk(k, dim=-1).indices  # distinct experts per token, uneven load
    w = torch.rand(N, k, device="cuda", generator=g) + 0.1
    wg, wu = (torch.randn(E, I, D, device="cuda", dtype=dtype, generator=g) * D ** -0.5 for _ in range(2))
    wd = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=g) * I ** -0.5
    return x, ids, w, wg, wu, wd


@pytest.mark.parametrize("dtype,N,tol", [(torch.bfloat16, 8192, BF16_TOL), (torch.float32, 1024, 1e-4)])
def test_moe_grouped_gemm_bench_2b_shape_fwd_bwd(dtype, N, tol):
    """The routed experts at bench-2b's shape (D 2048, I 512, 32 experts, top-8) against the torch
    path on fp32 copies: output and every gradient (x, routing weights, the three expert weights)."""
    from kernels.moe import moe_ffn, moe_sorted

    x, ids, w, wg, wu, wd = _moe_problem(N, 2048, 512, 32, 8, dtype)
    ids[: N // 2, 0] = 3  # one hot expert: many row tiles for it
    ids[:, 1:] = torch.where(ids[:, 1:] == 3, (ids[:, 1:] + 1) % 32, ids[:, 1:])
    dout = torch.randn(N, 2048, device="cuda", dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, wg, wu, wd)]
    out = moe_ffn(leaves[0], ids, leaves[1], *leaves[2:])
    (out.float() * dout.float()).sum().backward()
    refs = [t.detach().float().requires_grad_() for t in (x, w, wg, wu, wd)]
    ref = moe_sorted(refs[0], ids, refs[1], *refs[2:])
    (ref * dout.float()).sum().backward()
    assert out.dtype == dtype and relerr(out, ref) < tol
    for name, a, b in zip(("dx", "dweights", "dw_gate", "dw_up", "dw_down"), leaves, refs):
        assert relerr(a.grad, b.grad) < tol, (name, relerr(a.grad, b.grad))


def test_moe_grouped_gemm_has_no_host_sync():
    """Forward and backward of the routed experts run with CUDA's sync debug mode set to error:
    any device-to-host read (a per-expert .tolist(), nonzero, bincount) raises."""
    from kernels.moe import moe_ffn

    x, ids, w, wg, wu, wd = _moe_problem(512, 256, 128, 16, 4, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, wg, wu, wd)]
    out = moe_ffn(leaves[0], ids, leaves[1], *leaves[2:])  # first call compiles outside the check
    out.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_ffn(leaves[0], ids, leaves[1], *leaves[2:])
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
