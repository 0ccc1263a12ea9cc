"""The routed experts' small kernels compiled on CUDA, each exact against the torch it replaces: the
counting sort of the routed rows (kernels/moe/sort.py: torch's order, counts and offsets at
bench-2b's decode size, 256 tokens top-8 of 32 experts, and Ring-2.6-1T's 256 experts; the grouped
GEMM's bits unchanged by it) and the sum over the k slots (grouped.sum_slots: torch's CUDA sum bit
for bit), and a decode step's MoE captured in a CUDA graph without host syncs. Skipped without
CUDA; the CPU-interpreter cases are in test_kernels_moe.py."""
from __future__ import annotations

import pytest
import torch

from kernels.moe import moe_ffn
from kernels.moe import sort as msort
from kernels.moe.grouped import sum_slots
from kernels.moe.reference import sum_slots as sum_slots_ref
from capture import capture_without_syncs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "auto")  # CUDA tensors -> Triton


def routed(N: int, E: int, k: int, seed: int = 0, hot: bool = False) -> torch.Tensor:
    """[N, k] distinct experts per token (top-k of random logits: uneven loads, some experts empty at
    small N); `hot`: half the tokens put expert 0 first (one expert far over a row block)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(N, E, device="cuda", generator=g)
    if hot:
        logits[: N // 2, 0] = 100.0
    return logits.topk(k, dim=-1).indices


def assert_same_layout(ids: torch.Tensor, E: int) -> None:
    got = msort.sort_small(ids, E)
    want = msort.sort_torch(ids, E)
    for name, a, b in zip(("order", "counts", "offsets"), got, want):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), (name, tuple(ids.shape), E)


@pytest.mark.parametrize("N,k,E", [(256, 8, 32), (256, 8, 256), (1, 8, 32), (1, 8, 256), (7, 1, 32),
                                   (1024, 8, 32), (1024, 8, 256), (37, 5, 48), (300, 6, 160)])
def test_counting_sort_equals_the_torch_sort(N, k, E):
    """Top-k routing (uneven, hot expert), and uniform ids with repeats inside a token."""
    assert msort.fits_counting_sort(N * k, E)
    assert_same_layout(routed(N, E, k), E)
    assert_same_layout(routed(N, E, k, seed=1, hot=True), E)
    g = torch.Generator(device="cuda").manual_seed(2)
    assert_same_layout(torch.randint(0, E, (N, k), device="cuda", generator=g), E)
    assert_same_layout(torch.full((N, k), E - 1, device="cuda"), E)  # one expert has every row


@pytest.mark.parametrize("N,K,D,dtype", [(256, 8, 2048, torch.bfloat16), (4096, 8, 2048, torch.bfloat16),
                                          (256, 6, 1000, torch.float16), (300, 1, 2048, torch.float32),
                                          (64, 15, 512, torch.bfloat16), (1, 8, 2048, torch.bfloat16)])
def test_sum_slots_is_torchs_cuda_sum_bit_for_bit(N, K, D, dtype):
    """The combine kernel against the two kernels it replaces, in fp32 (where the order of the adds
    shows) and after the one rounding; and the order reference.sum_slots spells out is torch's."""
    g = torch.Generator(device="cuda").manual_seed(K)
    scale = 10.0 ** torch.randint(-3, 3, (N, K, D), device="cuda", generator=g)
    y = (torch.randn(N, K, D, device="cuda", generator=g) * scale).to(dtype)  # order-sensitive sums
    want = y.sum(1, dtype=torch.float32)
    assert torch.equal(sum_slots_ref(y), want), "torch's CUDA sum no longer adds in the reference's order"
    assert torch.equal(sum_slots(y, torch.float32), want)
    assert torch.equal(sum_slots(y, dtype), want.to(dtype))


def _decode_problem(N, D, I, E, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.rand(N, k, device="cuda", generator=g) + 0.1
    wg, wu = ((torch.randn(E, I, D, device="cuda", generator=g) * D ** -0.5).bfloat16() for _ in range(2))
    wd = (torch.randn(E, D, I, device="cuda", generator=g) * I ** -0.5).bfloat16()
    return x, routed(N, E, k, seed), w, wg, wu, wd


@pytest.mark.parametrize("E,D,I", [(32, 2048, 512), (256, 1024, 256)])
def test_moe_ffn_gives_the_same_bits_with_either_sort(monkeypatch, E, D, I):
    """bench-2b's decode MoE (and 256 experts at a smaller width): output and every gradient equal
    with the counting sort and with the torch sort (forced by a zero threshold)."""
    x, ids, w, wg, wu, wd = _decode_problem(256, D, I, E, 8)
    dout = torch.randn(256, D, device="cuda", dtype=torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, wg, wu, wd)]
        out = moe_ffn(leaves[0], ids, leaves[1], *leaves[2:])
        (out.float() * dout.float()).sum().backward()
        return [out] + [t.grad for t in leaves]

    fast = run()
    monkeypatch.setattr(msort, "SMALL_ROWS", 0)
    slow = run()
    for name, a, b in zip(("out", "dx", "dweights", "dw_gate", "dw_up", "dw_down"), fast, slow):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("E", [32, 256])
def test_decode_moe_captures_in_a_cuda_graph_without_host_syncs(E):
    """The layout and the routed experts of a decode step: no device-to-host read (sync debug mode
    "error" raises on one), capturable, and a replay on new ids and activations equals the eager
    call on them bit for bit (and the torch sort's layout)."""
    D, I, N, k = 1024, 256, 256, 8
    x, ids, w, wg, wu, wd = _decode_problem(N, D, I, E, k)

    def step():
        return msort.expert_layout(ids, E), moe_ffn(x, ids, w, wg, wu, wd)

    with torch.no_grad():
        graph, ((order, counts, offsets), out) = capture_without_syncs(step)
        new_x, new_ids = _decode_problem(N, D, I, E, k, seed=5)[:2]
        x.copy_(new_x)
        ids.copy_(new_ids)  # new inputs, same address
        graph.replay()
        (e_order, e_counts, e_offsets), eager = step()
        torch.cuda.synchronize()
    assert torch.equal(order, e_order) and torch.equal(counts, e_counts) and torch.equal(offsets, e_offsets)
    assert torch.equal(out, eager)
    assert all(map(torch.equal, (order, counts, offsets), msort.sort_torch(new_ids, E)))
