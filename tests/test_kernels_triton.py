"""Triton kernels vs the references, on CPU under TRITON_INTERPRET=1 (tiny shapes, fresh seeds).

Tolerances are relative errors ||out - ref|| / ||ref|| against a float64 oracle: fp32 far under
1e-3, fp16 under 3e-3, bf16 under 1e-2; NaN never passes. On a CUDA machine the same tests run
the compiled kernels.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.lightning import lightning_attn, lightning_decode, recurrent_lightning  # noqa: E402
from kernels.mla import attention, mla_decode, mla_prefill, paged_decode  # noqa: E402
from numerics import relerr  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


def _leaf(*xs):
    return [x.detach().requires_grad_() for x in xs]


def _oracle(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("varlen", [False, True])
def test_lightning_chunk_fwd_bwd(dtype, varlen, seed):
    H, K, V = 2, 16, 32
    if varlen:  # lengths cross chunk boundaries and include a length-1 sequence
        cu = torch.tensor([0, 70, 71, 100], dtype=torch.int32, device=DEV)
        B, T, N = 1, 100, 3
    else:
        cu, B, T = None, 2, 67
        N = B
    q = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    k = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    v = torch.randn(B, T, H, V, device=DEV, dtype=dtype)
    h0 = torch.randn(N, H, K, V, device=DEV)
    g = -torch.rand(H, device=DEV) * 0.3 - 0.01
    q, k, v, h0 = _leaf(q, k, v, h0)
    o, ht = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    ((o * do).sum() + (ht * dht).sum()).backward()

    qd, kd, vd, hd = _oracle(q, k, v, h0)
    o_ref, ht_ref = recurrent_lightning(qd, kd, vd, g, K ** -0.5, hd, True, cu)
    ((o_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    tol = TOL[dtype]
    assert o.dtype == dtype and ht.dtype == torch.float32
    for name, a, b in [("o", o, o_ref), ("ht", ht, ht_ref), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad),
                       ("dv", v.grad, vd.grad), ("dh0", h0.grad, hd.grad)]:
        assert relerr(a, b) < tol, f"{name} rel err {relerr(a, b):.2e} >= {tol} (seed {seed})"


def test_lightning_no_state_matches_torch_path(seed, monkeypatch):
    q, k, v = (torch.randn(1, 9, 2, 16, device=DEV) for _ in range(3))
    g = -torch.rand(2, device=DEV) - 0.01
    o, ht = lightning_attn(q, k, v, g)
    monkeypatch.setenv("KPOP_KERNELS", "torch")
    o_ref, _ = lightning_attn(q, k, v, g)
    assert ht is None and relerr(o, o_ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lightning_decode_matches_recurrence(dtype, seed):
    B, T, H, K, V = 3, 5, 2, 16, 40  # V not a power of two: masked value tiles
    q = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    k = torch.randn(B, T, H, K, device=DEV, dtype=dtype)
    v = torch.randn(B, T, H, V, device=DEV, dtype=dtype)
    g = -torch.rand(H, device=DEV) * 0.3 - 0.01
    h0 = torch.randn(B, H, K, V, device=DEV)
    o_ref, s_ref = recurrent_lightning(q.double(), k.double(), v.double(), g, 0.25, h0.double(), True)
    pool = torch.zeros(6, H, K, V, device=DEV)
    slots = torch.tensor([5, 1, 3], device=DEV)
    pool[slots] = h0
    for t in range(T):
        o_t = lightning_decode(q[:, t], k[:, t], v[:, t], g, pool, slots, scale=0.25)
        assert o_t.dtype == dtype and relerr(o_t, o_ref[:, t]) < TOL[dtype], f"step {t} seed {seed}"
    assert relerr(pool[slots], s_ref) < 1e-5, f"seed {seed}"
    assert pool[[0, 2, 4]].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lightning_prefill_then_decode_keeps_fp32_state(dtype, seed):
    """Cached decode = chunk prefill, then recurrent steps from its final state. Keys and values
    share a large mean that q is orthogonal to, so the state is large and q S mostly cancels: any
    rounding of the state, of A or of the decayed k/v to 16 bits before a dot shows up. Outputs
    must stay within 3x the error of rounding the exact output to dtype (a kernel that cast them
    to bf16 was at 5x, its state 2e-3 off; fp16 state 2e-5). bf16 splits the state update's fp32
    operand into two bf16 MMAs and rounds A and S to one bf16 piece for the output products
    (chunk.dot32, ~1.4x here); the interpreter makes the same roundings (chunk.rne16)."""
    B, T, steps, H, K, V = 2, 150, 3, 2, 16, 32
    q = torch.randn(B, T + steps, H, K, device=DEV)
    q[..., 0] = 0
    k = torch.randn(B, T + steps, H, K, device=DEV)
    k[..., 0] += 8
    v = torch.randn(B, T + steps, H, V, device=DEV) + 4
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    h0 = torch.randn(B, H, K, V, device=DEV)
    h0[:, :, 0] += 500
    g = torch.tensor([-0.002, -0.02], device=DEV)
    o_ref, _ = recurrent_lightning(q.double(), k.double(), v.double(), g, K ** -0.5, h0.double())
    _, ht_ref = recurrent_lightning(q[:, :T].double(), k[:, :T].double(), v[:, :T].double(), g, K ** -0.5,
                                    h0.double(), True)

    def check(out, ref, what):
        err, floor = relerr(out, ref), relerr(ref.to(dtype), ref)
        assert err < 3 * floor, f"{what} rel err {err:.2e} >= 3x rounding {floor:.2e} (seed {seed})"

    o, ht = lightning_attn(q[:, :T], k[:, :T], v[:, :T], g, initial_state=h0, output_final_state=True)
    check(o, o_ref[:, :T], "prefill")
    assert relerr(ht, ht_ref) < 5e-6, f"final state rel err {relerr(ht, ht_ref):.2e} (seed {seed})"
    for t in range(T, T + steps):
        check(lightning_decode(q[:, t], k[:, t], v[:, t], g, ht), o_ref[:, t], f"decode step {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_mla_prefill_fwd_bwd_varlen(dtype, causal, seed):
    H, Dqk, Dv = 2, 48, 32  # Dqk = 32 + 16 exercises the split (like 128 + 64)
    cu = torch.tensor([0, 30, 31, 133], dtype=torch.int32, device=DEV)
    q = torch.randn(1, 133, H, Dqk, device=DEV, dtype=dtype)
    k = torch.randn(1, 133, H, Dqk, device=DEV, dtype=dtype)
    v = torch.randn(1, 133, H, Dv, device=DEV, dtype=dtype)
    q, k, v = _leaf(q, k, v)
    o = mla_prefill(q, k, v, Dqk ** -0.5, cu, causal)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    qd, kd, vd = _oracle(q, k, v)
    o_ref = attention(qd, kd, vd, Dqk ** -0.5, cu, causal)
    (o_ref * do.double()).sum().backward()
    tol = TOL[dtype]
    for name, a, b in [("o", o, o_ref), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)]:
        assert relerr(a, b) < tol, f"{name} rel err {relerr(a, b):.2e} >= {tol} (seed {seed})"


def test_mla_prefill_dense_batch_pow2_dim(seed):
    q, k, v = (torch.randn(2, 70, 2, 32, device=DEV) for _ in range(3))
    o = mla_prefill(q, k, v, 0.2)
    assert relerr(o, attention(q.double(), k.double(), v.double(), 0.2)) < 1e-4, f"seed {seed}"


def test_mla_prefill_max_seqlen_equals_computing_it(seed):
    """The caller's longest length (no host sync) gives the bits of the computed one, forward and
    backward; a larger bound only adds programs that exit at once."""
    H, Dqk, Dv = 2, 48, 32
    cu = torch.tensor([0, 30, 31, 133], dtype=torch.int32, device=DEV)
    x = [torch.randn(1, 133, H, d, device=DEV, dtype=torch.bfloat16) for d in (Dqk, Dqk, Dv)]
    do = torch.randn(1, 133, H, Dv, device=DEV, dtype=torch.bfloat16)
    runs = []
    for max_seqlen in (None, 102, 133):
        q, k, v = _leaf(*x)
        o = mla_prefill(q, k, v, Dqk ** -0.5, cu, max_seqlen=max_seqlen)
        (o * do).sum().backward()
        runs.append((o, q.grad, k.grad, v.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), f"seed {seed}"


def test_mla_prefill_max_seqlen_below_the_longest_is_refused():
    q, k, v = (torch.randn(1, 40, 2, d, device=DEV) for d in (48, 48, 32))
    cu = torch.tensor([0, 10, 40], dtype=torch.int32)  # in host memory: checking is free
    with pytest.raises(ValueError, match="below the longest sequence \\(30\\)"):
        mla_prefill(q, k, v, 0.2, cu, max_seqlen=29)
    for bad in (0, 41, 30.0, True):
        with pytest.raises(ValueError, match="max_seqlen must be an int in \\[1, T=40\\]"):
            mla_prefill(q, k, v, 0.2, cu, max_seqlen=bad)
    with pytest.raises(ValueError, match="without cu_seqlens"):
        mla_prefill(q, k, v, 0.2, max_seqlen=39)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("cache_dtype,latent_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32)])
def test_mla_cache_write_kernel_equals_reference(cache_dtype, latent_dtype, seed):
    """The Triton scatter (no host sync) writes the reference's bits: rows at their slots, rows of
    negative slots nowhere, every other cache row untouched; a strided latent is read in place."""
    from kernels.mla import cache_write, mla_cache_write

    blocks, page, Dk, N = 6, 8, 72, 21  # 72 wide: a masked tail in the padded row
    cache = torch.randn(blocks, page, Dk, device=DEV).to(cache_dtype)
    wide = torch.randn(N, Dk + 5, device=DEV).to(latent_dtype)
    latent = wide[:, 2:2 + Dk]  # row stride Dk + 5
    slots = torch.randperm(blocks * page, device=DEV)[:N]
    slots[torch.randperm(N, device=DEV)[:7]] = -1  # padding rows, anywhere
    slots[0] = -5
    ref, by_hand = cache.clone(), cache.clone().view(-1, Dk)
    cache_write(ref, latent, slots)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            by_hand[s] = latent[i].to(cache_dtype)
    mla_cache_write(cache, latent, slots.int() if seed % 2 else slots)  # int32 or int64 slots
    assert torch.equal(_bits(ref), _bits(by_hand.view_as(ref))), f"seed {seed}"
    assert torch.equal(_bits(cache), _bits(ref)), f"seed {seed}"


def test_mla_cache_write_slot_past_the_end():
    """In host memory a slot past the cache is refused, naming it; the kernel itself (on a GPU,
    unchecked) skips such a row rather than write outside the cache."""
    from kernels.mla import mla_cache_write
    from kernels.mla.cache import cache_write_triton

    cache = torch.zeros(2, 4, 16)  # host memory even on a GPU machine: the check is for host slots
    with pytest.raises(ValueError, match="slot 8 is past the cache's 8 rows"):
        mla_cache_write(cache, torch.ones(2, 16), torch.tensor([1, 8]))
    assert cache.sum() == 0  # refused before anything was written
    big = torch.zeros(3, 4, 16, device=DEV)
    cache_write_triton(big[:2], torch.ones(2, 16, device=DEV), torch.tensor([1, 8], device=DEV))
    assert big[2].sum() == 0 and big.view(-1, 16)[1].eq(1).all() and big.sum() == 16
    mla_cache_write(big, torch.ones(0, 16, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV))  # nothing to do
    assert big.sum() == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v_dim,page", [(32, 8), (20, 8), (32, 64)])
def test_mla_paged_decode(dtype, v_dim, page, seed):
    # Dk = 32 + 16 like 512 + 64; v_dim 32 shares the key tile; page 64 holds whole token tiles
    B, H, Dk = 3, 4, 48
    cache = torch.randn(20, page, Dk, device=DEV, dtype=dtype)
    table = torch.randperm(20, device=DEV)[:18].reshape(B, 6).int()
    lens = torch.tensor([1, 17, 5 * page + 3], device=DEV, dtype=torch.int32)
    q = torch.randn(B, H, Dk, device=DEV, dtype=dtype)
    o = mla_decode(q, cache, table, lens, 0.2, v_dim)
    ref = paged_decode(q.double(), cache.double(), table, lens, 0.2, v_dim)
    assert o.shape == (B, H, v_dim) and o.dtype == dtype
    assert relerr(o, ref) < TOL[dtype], f"rel err {relerr(o, ref):.2e} (seed {seed})"


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_mla_paged_decode_any_split_count(num_splits, seed):
    """The KV split count need not be a power of two (the merge masks its tile), and splits past
    a sequence's end (empty slices) must weigh nothing."""
    from kernels.mla.decode import paged_decode_triton

    B, H, Dk, page = 2, 4, 48, 8
    cache = torch.randn(12, page, Dk, device=DEV)
    table = torch.randperm(12, device=DEV)[:10].reshape(B, 5).int()
    lens = torch.tensor([3, 37], device=DEV, dtype=torch.int32)  # 3 tokens: all splits but the first are empty
    q = torch.randn(B, H, Dk, device=DEV)
    # 16-token tiles over 8-token pages: the row-by-row gather path (compiled dots need K >= 16)
    o = paged_decode_triton(q, cache, table, lens, 0.2, 32, block_n=16, num_splits=num_splits)
    ref = paged_decode(q.double(), cache.double(), table, lens, 0.2, 32)
    assert relerr(o, ref) < TOL[torch.float32], f"rel err {relerr(o, ref):.2e} (seed {seed})"


def test_mla_decode_kernel_choice_errors():
    """The Gluon kernel is Hopper-only: asking for it elsewhere, or for an unknown kernel, is a clear error."""
    from kernels.mla.decode import paged_decode_triton

    q, cache = torch.randn(1, 4, 48, device=DEV), torch.randn(2, 8, 48, device=DEV)
    table, lens = torch.zeros(1, 2, dtype=torch.int32, device=DEV), torch.tensor([5], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="sm_90"):
        paged_decode_triton(q, cache, table, lens, 0.2, 32, kernel="gluon")
    with pytest.raises(ValueError, match="kernel='flash'"):
        paged_decode_triton(q, cache, table, lens, 0.2, 32, kernel="flash")
