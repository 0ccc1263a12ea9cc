"""`kpop plan` (kpop/policy/plan.py, kpop/cli/plan.py): sizes from the config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kpop.cli.main import app
from kpop.config import ConfigError, load_config
from kpop.policy.config import BailingHybridConfig
from kpop.policy.model import BailingMoeV2_5ForCausalLM
from kpop.policy.plan import count_params, plan_policy, plan_run_config
from kpop.policy.presets import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name, total, active",
    [("ring-2.6-1t.yaml", 1.0e12, 63e9), ("ling-2.6-flash.yaml", 104e9, 7.4e9)],
)
def test_published_totals_within_3_percent(name, total, active):
    p = plan_run_config(load_config(CONFIGS / name))
    assert abs(p.total_params / total - 1) < 0.03, p.total_params
    assert abs(p.active_params / active - 1) < 0.03, p.active_params


def test_flash_cache_sizes():
    p = plan_run_config(load_config(CONFIGS / "ling-2.6-flash.yaml"))
    assert (p.num_mla_layers, p.num_linear_layers) == (4, 28)
    assert p.mla_cache_bytes_per_token == 4 * 576 * 2  # 4 MLA layers x 576 bf16 values
    assert p.linear_state_bytes_per_sequence == 28 * 32 * 128 * 128 * 4
    assert p.train_bytes_per_gpu[64] == -(-(p.total_params + p.mtp_params) * 16 // 64)


def _meta_model(cfg: BailingHybridConfig) -> BailingMoeV2_5ForCausalLM:
    with torch.device("meta"):
        return BailingMoeV2_5ForCausalLM(cfg)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"q_lora_rank": None, "use_qkv_bias": True, "use_bias": True, "num_nextn_predict_layers": 2},
     {"num_shared_experts": 2, "first_k_dense_replace": 3, "use_qk_norm": False, "num_hidden_layers": 12}],
)
def test_counts_equal_the_built_model(overrides):
    cfg = tiny_config(200, **overrides)
    model = _meta_model(cfg)
    L = cfg.num_hidden_layers
    mtp = sum(p.numel() for n, p in model.named_parameters() if int(n.split(".")[2] if n.startswith("model.layers.") else -1) >= L)
    total = sum(p.numel() for p in model.parameters()) - mtp
    p = plan_policy(cfg)
    assert (p.total_params, p.mtp_params) == (total, mtp)
    # a token skips all but num_experts_per_tok routed experts in each MoE layer
    per_expert = sum(x.numel() for x in model.model.layers[L - 1].mlp.experts[0].parameters())
    n_moe = L - cfg.first_k_dense_replace
    assert p.active_params == total - n_moe * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    assert count_params(cfg).embedding == 200 * cfg.hidden_size


def test_cli_json_and_text():
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(CONFIGS / "ring-2.6-1t.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {"total_params", "active_params", "mla_cache_bytes_per_token", "linear_state_bytes_per_sequence",
            "train_bytes_per_gpu", "serve_bytes_total"} <= set(data)
    assert data["mla_cache_bytes_per_token"] == 10 * 576 * 2
    res = runner.invoke(app, ["plan", str(CONFIGS / "ling-2.6-flash.yaml")])
    assert res.exit_code == 0 and "104.19B" in res.output and "7.45B" in res.output


def test_cli_bad_arch_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  arch:\n    num_experts: 10\n    n_group: 4\nenvironments:\n  train: []\nschedule:\n  rl_steps: 0\n")
    res = CliRunner().invoke(app, ["plan", str(bad)])
    assert isinstance(res.exception, ConfigError)
    assert "policy.arch" in str(res.exception) and "num_experts (10) must be divisible by n_group (4)" in str(res.exception)


def test_plan_reads_only_the_checkpoint_config(tmp_path):
    cfg = tiny_config(300)
    cfg.save_pretrained(tmp_path / "ckpt")  # config.json alone: plan must not need the weights
    run = tmp_path / "run.yaml"
    run.write_text(f"policy:\n  checkpoint: {tmp_path / 'ckpt'}\nenvironments:\n  train: []\nschedule:\n  rl_steps: 0\n")
    p = plan_run_config(load_config(run))
    assert p.total_params == plan_policy(cfg).total_params
    assert p.counts.embedding == 300 * cfg.hidden_size


def test_weight_sync_estimate_adds_up_and_is_on_the_cli():
    from kpop.policy.plan import plan_weight_sync

    p = plan_run_config(load_config(CONFIGS / "ring-2.6-1t.yaml"))
    s = plan_weight_sync(p, 256 << 20, copy_gb_per_s=2000.0, nccl_gb_per_s=50.0)
    assert s.weight_bytes == 2 * p.total_params
    assert s.buckets == -(-s.weight_bytes // (256 << 20))
    assert s.broadcast_s == pytest.approx(s.weight_bytes / 50e9)
    assert s.pipelined_s < s.seconds == pytest.approx(s.pack_s + s.broadcast_s + s.unpack_s)
    # twice the bus bandwidth: the broadcast, which dominates at 1T, halves
    assert plan_weight_sync(p, 256 << 20, 2000.0, 100.0).broadcast_s == pytest.approx(s.broadcast_s / 2)
    with pytest.raises(ValueError, match="positive"):
        plan_weight_sync(p, 0, 2000.0, 50.0)
    out = CliRunner().invoke(app, ["plan", str(CONFIGS / "ring-2.6-1t.yaml"), "--json", "--nccl-gbps", "50",
                                   "--copy-gbps", "2000"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["weight_sync"]["broadcast_s"] == pytest.approx(s.broadcast_s)
    bad = CliRunner().invoke(app, ["plan", str(CONFIGS / "ring-2.6-1t.yaml"), "--nccl-gbps", "0"])
    assert bad.exit_code != 0 and "positive" in bad.output
