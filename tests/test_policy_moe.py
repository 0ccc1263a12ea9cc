"""The policy's MoE block around the kernels: the Triton path equals the torch path, routing replay
(forced expert ids), the expert-load counter behind the aux-loss-free bias update, and the
`bench-2b` preset's size (by formula and on the meta device: nothing is allocated)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.presets import tiny_config  # noqa: E402

VOCAB = 128
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # KPOP_KERNELS=triton: compiled on CUDA, interpreted on CPU


@pytest.fixture
def block():
    torch.manual_seed(0)
    m = build_model(tiny_config(VOCAB), seed=0)
    b = m.model.layers[1].mlp
    with torch.no_grad():
        b.gate.weight.normal_(0, 0.5)  # spread the scores so the routing is decided, not near-tied
        b.gate.expert_bias.uniform_(-0.2, 0.2)
    return b


def _grads(b, x, **kw):
    b.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = b(x, **kw)
    y = y[0] if isinstance(y, tuple) else y
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in b.named_parameters() if p.grad is not None}


def test_triton_block_matches_torch_block(block, monkeypatch):
    block.to(DEV)
    x = torch.randn(2, 13, 64, device=DEV)
    monkeypatch.setenv("KPOP_KERNELS", "torch")
    y_ref, dx_ref, g_ref = _grads(block, x)
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    y, dx, g = _grads(block, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert set(g) == set(g_ref) and "gate.weight" in g
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-5, msg=n)


def test_forced_natural_ids_replay_exactly_and_other_ids_change_the_output(block):
    x = torch.randn(17, 64)
    y, dx, g = _grads(block, x)
    with torch.no_grad():
        y2, ids = block(x, return_expert_ids=True)
    assert ids.shape == (17, 2) and ids.dtype == torch.long
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    y3, dx3, g3 = _grads(block, x, expert_ids=ids)
    assert torch.equal(y3, y) and torch.equal(dx3, dx)
    assert all(torch.equal(g3[n], g[n]) for n in g)
    # other experts (the cyclically next ones): another output, and the router still learns
    other = (ids + 1) % block.gate.num_experts
    y4, _, g4 = _grads(block, x, expert_ids=other)
    assert (y4 - y).abs().max() > 1e-3
    assert g4["gate.weight"].abs().sum() > 0
    with torch.no_grad():
        _, used = block(x, expert_ids=other, return_expert_ids=True)
    assert torch.equal(used, other)


@pytest.mark.parametrize("bad,match", [
    (lambda ids: ids[:, :1], r"integer \[tokens=17, top_k=2\]"),
    (lambda ids: ids.float(), "integer"),
    (lambda ids: ids + 100, r"must lie in \[0, 8\)"),
    (lambda ids: ids - 100, r"must lie in \[0, 8\)"),
])
def test_hostile_forced_ids_are_named(block, bad, match):
    """Replayed ids come from stored trajectories: out-of-range ids would index past the expert
    weights (a device fault on the GPU), so they are refused with the reason."""
    x = torch.randn(17, 64)
    ids = torch.zeros(17, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        block(x, expert_ids=bad(ids))


def test_expert_load_counts_training_forwards_only(block):
    x = torch.randn(3, 5, 64)
    block.eval()
    with torch.no_grad():
        _, ids = block(x, return_expert_ids=True)
    assert block.gate.expert_load.sum() == 0  # inference does not count
    block.train()
    block(x)
    expect = torch.bincount(ids.flatten(), minlength=8)
    assert torch.equal(block.gate.expert_load, expect) and expect.sum() == 15 * 2
    block.gate.count_load = False  # as while checkpointing recomputes the layer
    block(x)
    assert torch.equal(block.gate.expert_load, expect)
    assert "gate.expert_load" not in block.state_dict()  # not a checkpoint tensor


def test_bench_2b_preset_size():
    from kpop.policy.config import config_from_arch
    from kpop.policy.model import BailingMoeV2_5ForCausalLM
    from kpop.policy.plan import plan_policy
    from kpop.policy.presets import bench_2b_arch, preset_arch

    c = config_from_arch(bench_2b_arch())
    assert c.vocab_size == 32000 and c.hidden_size == 2048 and c.num_nextn_predict_layers == 0
    assert [i for i, t in enumerate(c.mixer_types()) if t == "attention"] == [3, 7, 11, 15]
    plan = plan_policy(c)
    assert round(plan.total_params / 1e9, 2) == 2.02 and round(plan.active_params / 1e9, 2) == 0.89
    with torch.device("meta"):
        model = BailingMoeV2_5ForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == plan.total_params
    assert preset_arch("bench-2b", 1024)["vocab_size"] == 32000  # the local tokenizer fits in it
    with pytest.raises(ValueError, match="32000-token vocabulary"):
        preset_arch("bench-2b", 50000)
