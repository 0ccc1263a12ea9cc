"""bench/quickstart_seeds.py: a run's held-out gain, paired over the same tasks before and after RL."""
from __future__ import annotations

import json

import pytest

from bench.quickstart_seeds import paired_gain, run_gains
from kpop.config import dump_config, load_config
from kpop.metrics import MetricsWriter


def test_paired_gain_cancels_the_spread_between_tasks():
    # task difficulty varies a lot, but every task gained exactly 0.2: the paired error is 0
    gain, se = paired_gain([0.0, 0.5, 0.8], [0.2, 0.7, 1.0])
    assert gain == pytest.approx(0.2) and se == pytest.approx(0.0)
    gain, se = paired_gain([0.0, 0.0], [1.0, 0.0])
    assert gain == pytest.approx(0.5) and se == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same >= 2 held-out tasks"):
        paired_gain([0.0, 1.0], [1.0])


def test_run_gains_reads_a_run_directory(tmp_path):
    run = tmp_path / "qs"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config("configs/quickstart.yaml", ["seed=2"])))
    (run / "summary.json").write_text(json.dumps({"rl_steps": 3, "wall_s": 12.34}))
    writer = MetricsWriter(run, tensorboard=False)
    writer.log(0, {"eval_reward": 0.25, "eval_task_rewards": [0.0, 0.5], "eval_reward_sampled": 0.1,
                   "eval_task_rewards_sampled": [0.1, 0.1]}, phase="eval")
    writer.log(3, {"eval_reward": 0.75, "eval_task_rewards": [0.5, 1.0], "eval_reward_sampled": 0.2,
                   "eval_task_rewards_sampled": [0.1, 0.3]}, phase="eval")
    writer.close()
    out = run_gains(run)
    assert out["seed"] == 2 and out["tasks"] == 2
    assert out["greedy"]["gain"] == pytest.approx(0.5) and out["greedy"]["goal_met"]
    assert out["sampled"]["gain"] == pytest.approx(0.1) and not out["sampled"]["goal_met"]


def test_a_run_without_per_task_rewards_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"rl_steps": 1, "wall_s": 1.0}))
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.log(0, {"eval_reward": 0.2}, phase="eval")
    writer.log(1, {"eval_reward": 0.4}, phase="eval")
    writer.close()
    with pytest.raises(ValueError, match="per-task rewards"):
        run_gains(tmp_path)
