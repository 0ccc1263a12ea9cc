"""The pure-torch kernel references and the public API's checks (fast, CPU)."""
from __future__ import annotations

import pytest
import torch

from kernels import _dispatch
from kernels.lightning import chunk_lightning, lightning_attn, lightning_decode, recurrent_lightning
from kernels.mla import mla_cache_write, mla_decode, mla_prefill, slot_mapping
from numerics import relerr  # noqa: E402


def _g(H: int) -> torch.Tensor:
    return -torch.rand(H, dtype=torch.float32) * 0.5 - 0.01


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "torch")


def test_chunk_reference_matches_recurrence():
    B, T, H, K, V = 2, 37, 3, 8, 5
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, h0, g = torch.randn(B, T, H, V), torch.randn(B, H, K, V), _g(H)
    o_ref, s_ref = recurrent_lightning(q.double(), k.double(), v.double(), g, 0.3, h0.double(), True)
    o, s = chunk_lightning(q, k, v, g, 0.3, h0, True, chunk_size=16)
    assert relerr(o, o_ref) < 1e-5 and relerr(s, s_ref) < 1e-5


def test_chunk_reference_varlen_equals_separate_calls():
    H, K, V = 2, 8, 8
    cu = torch.tensor([0, 5, 25, 26], dtype=torch.int32)
    q, k, v = torch.randn(1, 26, H, K), torch.randn(1, 26, H, K), torch.randn(1, 26, H, V)
    h0, g = torch.randn(3, H, K, V), _g(H)
    o, s = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = recurrent_lightning(q[:, a:b].double(), k[:, a:b].double(), v[:, a:b].double(), g, K ** -0.5,
                                       h0[n:n + 1].double(), True)
        assert relerr(o[:, a:b], o_n) < 1e-5 and relerr(s[n:n + 1], s_n) < 1e-5


def test_decode_reference_matches_recurrence_in_slots():
    B, T, H, K, V = 3, 6, 2, 8, 4
    q, k, v, g = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V), _g(H)
    o_ref, s_ref = recurrent_lightning(q.double(), k.double(), v.double(), g, 0.5, None, True)
    pool = torch.zeros(5, H, K, V)
    slots = torch.tensor([4, 0, 2])
    for t in range(T):
        o_t = lightning_decode(q[:, t], k[:, t], v[:, t], g, pool, slots, scale=0.5)
        assert relerr(o_t, o_ref[:, t]) < 1e-5
    assert relerr(pool[slots], s_ref) < 1e-5
    assert pool[[1, 3]].abs().sum() == 0  # untouched slots stay untouched


def test_mla_paged_decode_reference_matches_dense_attention():
    B, H, Dk, Dv, page = 2, 4, 24, 16, 4
    lens = torch.tensor([5, 11], dtype=torch.int32)
    cache = torch.zeros(8, page, Dk)
    table = torch.tensor([[6, 1, 0], [3, 7, 2]], dtype=torch.int32)
    lat = [torch.randn(int(n), Dk) for n in lens]
    for b in range(B):
        slots = slot_mapping(table, torch.full((int(lens[b]),), b), torch.arange(int(lens[b])), page)
        mla_cache_write(cache, lat[b], slots)
    q = torch.randn(B, H, Dk)
    o = mla_decode(q, cache, table, lens, scale=0.2, v_dim=Dv)
    for b in range(B):
        ref = ((q[b].double() @ lat[b].double().T) * 0.2).softmax(-1) @ lat[b][:, :Dv].double()
        assert relerr(o[b], ref) < 1e-5


def test_mla_prefill_reference_is_causal_softmax():
    q, k, v = torch.randn(1, 9, 2, 12), torch.randn(1, 9, 2, 12), torch.randn(1, 9, 2, 6)
    o = mla_prefill(q, k, v, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.3).transpose(1, 2)
    assert relerr(o, ref) < 1e-5


def test_cache_write_skips_padding_slots():
    cache = torch.zeros(2, 4, 3)
    mla_cache_write(cache, torch.ones(3, 3), torch.tensor([5, -1, 0]))
    assert cache.view(-1, 3)[[0, 5]].eq(1).all() and cache.sum() == 6
    with pytest.raises(ValueError, match="slot 8 is past the cache's 8 rows"):
        mla_cache_write(cache, torch.ones(1, 3), torch.tensor([8]))


def test_mla_prefill_reference_takes_a_max_seqlen_and_checks_it():
    q, k, v = torch.randn(1, 9, 2, 12), torch.randn(1, 9, 2, 12), torch.randn(1, 9, 2, 6)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert torch.equal(mla_prefill(q, k, v, 0.3, cu, max_seqlen=5), mla_prefill(q, k, v, 0.3, cu))
    with pytest.raises(ValueError, match="max_seqlen=4 is below the longest sequence \\(5\\)"):
        mla_prefill(q, k, v, 0.3, cu, max_seqlen=4)


@pytest.mark.parametrize("bad", [
    lambda: lightning_attn(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8), _g(2)),
    lambda: lightning_attn(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), _g(3)),
    lambda: lightning_attn(torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), _g(2),
                           cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
    lambda: lightning_attn(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), _g(2),
                           initial_state=torch.zeros(2, 2, 8, 8)),
    lambda: lightning_decode(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 4), _g(2),
                             torch.zeros(2, 2, 8, 4, dtype=torch.float64)),
    lambda: mla_decode(torch.randn(2, 4, 24), torch.zeros(3, 4, 16), torch.zeros(2, 1, dtype=torch.int32),
                       torch.ones(2, dtype=torch.int32), 1.0, 8),
    lambda: mla_prefill(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 6), torch.randn(1, 4, 2, 8), 1.0),
])
def test_bad_input_is_named(bad):
    with pytest.raises(ValueError, match=r"(lightning|mla)_\w+: "):
        bad()


def test_dispatch_modes(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("KPOP_KERNELS", "auto")
    assert _dispatch.backend(cpu) == "torch"
    monkeypatch.setenv("KPOP_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="KPOP_KERNELS"):
        _dispatch.backend(cpu)
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.backend(cpu)
