"""The fused router kernel (kernels/router) against the torch reference, on CPU under TRITON_INTERPRET=1
(on a CUDA machine the same tests run the compiled kernel).

On tie-free inputs the kernel must choose torch's experts in torch's order (ids equal), with weights
within a few fp32 ulps (rtol 1e-6): the k-term normalising sum is summed in another order, and on
CPU the interpreter's sigmoid (numpy exp) may differ from torch's by an ulp. With exact ties torch.topk
leaves the choice unspecified; the kernel takes the lowest index, checked against a written-out oracle.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.router import route, route_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [  # (N, E, n_group, topk_group, k)
    (37, 32, 8, 4, 8),    # bench-2b
    (20, 256, 8, 4, 8),   # Ring-2.6-1T
    (5, 16, 4, 2, 1),     # top-1: no normalisation
    (9, 8, 2, 1, 2),
    (6, 48, 3, 2, 5),     # 48 experts: padded to 64, groups of 16
    (3, 12, 4, 3, 9),     # groups of 3 (padded experts in the tile), k = every kept expert
]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


def tie_free(N: int, E: int, G: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits and bias whose biased scores and group scores have no exact ties in any row."""
    while True:
        logits = torch.randn(N, E, device=DEV) * scale
        bias = torch.randn(E, device=DEV) * 0.05
        biased = torch.sigmoid(logits) + bias
        group = biased.view(N, G, -1).topk(2, dim=-1).values.sum(-1)
        if all((x.sort(-1).values.diff(dim=-1) != 0).all() for x in (biased, group)):
            return logits, bias


@pytest.mark.parametrize("N,E,G,TG,k", SHAPES)
def test_kernel_chooses_torchs_experts_in_torchs_order(N, E, G, TG, k, seed):
    logits, bias = tie_free(N, E, G)
    with torch.no_grad():
        ids, w = route(logits, bias, G, TG, k, 2.5)
    ref_ids, ref_w = route_ref(logits, bias, G, TG, k, 2.5)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (N, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)


def _oracle(logits: torch.Tensor, bias: torch.Tensor, G: int, TG: int, k: int) -> list[list[int]]:
    """The selection written out, every tie to the lowest index (the fp32 sums as the kernel forms them)."""
    biased = torch.sigmoid(logits) + bias
    E = biased.shape[1]
    per = E // G
    out = []
    for row in biased:
        gs = [(row[g * per:(g + 1) * per].topk(2).values[0] + row[g * per:(g + 1) * per].topk(2).values[1]).item()
              for g in range(G)]
        groups = sorted(range(G), key=lambda g: (-gs[g], g))[:TG]
        cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
        out.append(sorted(cand, key=lambda e: (-row[e].item(), e))[:k])
    return out


def test_exact_ties_resolve_to_the_lowest_index():
    # logits 0 give scores of exactly 0.5; a bias from four values makes ties among experts and
    # among groups (torch.topk may break these either way; the kernel always takes the lowest index)
    torch.manual_seed(1)
    E, G, TG, k = 32, 8, 4, 6
    logits = torch.zeros(16, E, device=DEV)
    logits[8:] = torch.randint(-1, 2, (8, E), device=DEV).float()  # a few distinct levels per row
    bias = torch.tensor([0.0, 0.25, 0.5, 0.125], device=DEV)[torch.randint(0, 4, (E,))]
    with torch.no_grad():
        ids, w = route(logits, bias, G, TG, k, 1.0)
    assert ids.tolist() == _oracle(logits, bias, G, TG, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(16, device=DEV), rtol=1e-6, atol=0)


def test_bad_router_arguments_are_named():
    lg, b = torch.randn(4, 32, device=DEV), torch.zeros(32, device=DEV)
    with pytest.raises(ValueError, match=r"logits must be \[N, E\]"):
        route(lg[0], b, 8, 4, 8, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \[E=32\]"):
        route(lg, b[:16], 8, 4, 8, 1.0)
    with pytest.raises(ValueError, match="32 experts must split into n_group=5"):
        route(lg, b, 5, 4, 8, 1.0)
    with pytest.raises(ValueError, match="k=17 <= the 16 experts"):
        route(lg, b, 8, 4, 17, 1.0)


def test_autograd_on_keeps_the_reference_and_the_routers_gradient(seed):
    logits = torch.randn(5, 32, device=DEV, requires_grad=True)
    ids, w = route(logits, torch.zeros(32, device=DEV), 8, 4, 8, 1.0)
    (w * torch.arange(8.0, device=DEV)).sum().backward()  # a sum of normalised weights has no gradient
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_model_gate_uses_the_kernel_under_no_grad(monkeypatch, seed):
    """MoEGate: the router's own choice runs the kernel in inference, equal to the eager path;
    replay (forced expert_ids) keeps the torch path."""
    from kpop.policy.model import MoEGate
    from kpop.policy.presets import tiny_config

    import kernels.router.select as ks

    calls = []
    real = ks.route_triton
    monkeypatch.setattr(ks, "route_triton", lambda *a: calls.append(1) or real(*a))
    cfg = tiny_config(64, num_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8, routed_scaling_factor=2.5)
    gate = MoEGate(cfg).to(DEV).eval()
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
        gate.expert_bias.normal_(0, 0.05)
    x = torch.randn(23, cfg.hidden_size, device=DEV)
    ids, w = gate(x)  # autograd on: the reference
    assert w.grad_fn is not None and not calls
    with torch.no_grad():
        kids, kw = gate(x)
        assert calls
        calls.clear()
        rids, rw = gate(x, expert_ids=ids)
    assert not calls
    assert torch.equal(kids, ids)
    torch.testing.assert_close(kw, w.detach(), rtol=1e-6, atol=0)
    assert torch.equal(rids, ids)
    torch.testing.assert_close(rw, w.detach(), rtol=0, atol=0)
