"""The learner's GPU-scale machinery, checked on CPU: activation checkpointing gives the same step,
chunked logprobs equal the full-vocabulary ones, and the aux-loss-free expert-bias update moves the
bias by load (never by gradient) and reports max/min load per MoE layer."""
from __future__ import annotations

import torch

from kpop.config import AlgorithmConfig, LearnerConfig
from kpop.policy.model import BailingMoeV2_5ForCausalLM
from kpop.policy.presets import tiny_config
from kpop.trajectory import Trajectory
from learner.learner import Learner
from learner.packing import chunked_token_logprobs, pack, token_logprobs

torch.manual_seed(0)
_INIT = BailingMoeV2_5ForCausalLM(tiny_config()).state_dict()


def _learner(**cfg) -> Learner:
    model = BailingMoeV2_5ForCausalLM(tiny_config())
    model.load_state_dict(_INIT)
    lcfg = LearnerConfig(lr=1e-3, zero_stage=1, micro_batch_tokens=64, **cfg)
    return Learner(lcfg, AlgorithmConfig(correction="none"), model)


def _batch() -> list[Trajectory]:
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(2):
        prompt = torch.randint(2, 1024, (6,), generator=g).tolist()
        for j in range(4):
            ids = prompt + torch.randint(2, 1024, (10 + j,), generator=g).tolist()
            mask = [0] * 6 + [1] * (len(ids) - 6)
            out.append(Trajectory(run_id="t", task_id=f"t{k}", env_id="test", group_id=f"g{k}", token_ids=ids,
                                  logprobs=[-6.9 * m for m in mask], loss_mask=mask, reward=float(j % 2)))
    return out


def test_checkpointed_step_equals_plain_step_and_balances_experts():
    batch = _batch()
    plain, ckpt = _learner(activation_checkpointing=False), _learner(activation_checkpointing=True)
    assert plain.checkpointed_layers == 0 and ckpt.checkpointed_layers == 9  # 8 decoder layers + 1 MTP
    gates = [g for _, g in plain._gates]
    bias0 = [g.expert_bias.clone() for g in gates]
    m_plain, m_ckpt = plain.train_step(batch), ckpt.train_step(batch)
    a, b = plain.export_weights()[0], ckpt.export_weights()[0]
    for k in a:  # the recompute is the same arithmetic: the same update
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert m_plain["entropy"] > 0 and abs(m_plain["entropy"] - m_ckpt["entropy"]) < 1e-5

    # load reported once per routed row (a recompute does not count again), per MoE layer
    layers = [f"layers.{i}" for i in range(1, 8)]
    for name in layers:
        hi, lo = m_plain[f"moe_load_max/{name}"], m_plain[f"moe_load_min/{name}"]
        assert hi >= 1.0 >= lo >= 0.0 and hi > lo
        assert m_ckpt[f"moe_load_max/{name}"] == hi and m_ckpt[f"moe_load_min/{name}"] == lo
    # the bias moved by exactly the rate, against the load; the counts were reset
    rate = plain.cfg.expert_bias_update_rate
    for (name, g), before in zip(plain._gates, bias0):
        step = g.expert_bias - before
        if name.startswith("model.layers.8."):  # the MTP layer: not run for RL logprobs, not moved
            assert torch.equal(step, torch.zeros_like(step)) and "moe_load_max/layers.8" not in m_plain
            continue
        assert (torch.isclose(step.abs(), torch.tensor(rate)) | (step == 0)).all(), name
        assert (step > 0).any() and (step < 0).any(), name
        assert g.expert_load.sum() == 0 and not g.expert_bias.requires_grad
    assert not any("expert_bias" in n for n, _ in plain.engine.module.named_parameters())


def test_bias_update_follows_load_direction():
    from learner.learner import balance_experts

    model = BailingMoeV2_5ForCausalLM(tiny_config())
    gates = [(n, m) for n, m in model.named_modules() if hasattr(m, "expert_load")]
    name, gate = gates[0]
    gate.expert_bias.zero_()
    gate.expert_load.copy_(torch.tensor([10, 0, 2, 2, 2, 2, 2, 4]))  # mean 3
    out = balance_experts(gates, 0.01)
    torch.testing.assert_close(gate.expert_bias, torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1]) * 0.01)
    assert name == "model.layers.1.mlp.gate" and abs(out["moe_load_max/layers.1"] - 10 / 3) < 1e-6
    assert out["moe_load_min/layers.1"] == 0.0
    assert "moe_load_max/layers.2" not in out  # a layer that saw nothing reports nothing
    assert gate.expert_load.sum() == 0


def test_chunked_logprobs_equal_full_vocabulary_logprobs():
    model = BailingMoeV2_5ForCausalLM(tiny_config()).train()
    model.load_state_dict(_INIT)
    packed = pack([list(range(2, 30)), list(range(40, 61))], [0, 1])
    out = model(packed.input_ids, cu_seqlens=packed.cu_seqlens, return_mtp=False)
    full = token_logprobs(out.logits, packed.input_ids)
    (g_full,) = torch.autograd.grad((full * torch.arange(full.numel())).sum(), model.lm_head.weight)
    out = model(packed.input_ids, cu_seqlens=packed.cu_seqlens, return_mtp=False, return_logits=False)
    assert out.logits is None
    lp, ent = chunked_token_logprobs(out.hidden_states, model.logits, packed.input_ids, chunk_rows=5, with_entropy=True)
    (g_chunk,) = torch.autograd.grad((lp * torch.arange(lp.numel())).sum(), model.lm_head.weight)
    torch.testing.assert_close(lp, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-7)
    logits = model.logits(out.hidden_states)[0, :-1].detach()
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent[1:], -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)
    assert ent[0] == 0 and not ent.requires_grad
