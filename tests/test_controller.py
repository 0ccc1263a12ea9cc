"""The controller end to end (actors/controller.py): real Ray, embedded Redis, DeepSpeed learner,
embedded rollout engine, on a tiny config. Runs are shared between assertions (module fixtures):
each costs ~40-70 s on 2 cores, mostly Ray, learner and engine start-up."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kpop.archive import TrajectoryArchive
from kpop.metrics import read_metrics
from kpop.policy.checkpoint import load_checkpoint
from train_helpers import (BATCH, assert_each_episode_settled_once, assert_each_trained_once,
                           learner_checkpoint_weights, small_config)

pytestmark = pytest.mark.slow
SUMMARY_KEYS = {"reward_first", "reward_last", "eval_reward_before_rl", "eval_reward_after_rl", "rl_steps",
                "episodes_submitted", "trajectories_consumed", "trajectories_dropped_stale",
                "trajectories_dropped_small_group", "trajectories_failed", "mean_staleness", "kpop_mask_rate",
                "cut_rate", "wall_s"}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An async run of 2 RL steps, then the same config with rl_steps=4 (resumes from step 2)."""
    from actors.controller import train

    logging.getLogger("kpop").setLevel(logging.INFO)
    base = tmp_path_factory.mktemp("runs")
    first = train(small_config(base, "resume", "schedule.rl_steps=2"))
    first_rows = read_metrics(base / "resume", phase="rl")
    second = train(small_config(base, "resume", "schedule.rl_steps=4"))
    return base / "resume", first, first_rows, second


def test_run_directory_and_summary(resumed):
    run, _, _, summary = resumed
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    assert list((run / "trajectories").glob("part-*.parquet"))
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["rl_steps"] == 4
    assert summary["trajectories_consumed"] == 4 * BATCH and summary["mode"] == "async"
    for key in ("reward_first", "reward_last", "eval_reward_before_rl", "eval_reward_after_rl",
                "eval_reward_sampled_before_rl", "eval_reward_sampled_after_rl"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["mean_staleness"] is not None and summary["wall_s"] > 0
    # every step says how many of the episodes it saw the runner cut (scored 0, never graded)
    rows = read_metrics(run, phase="rl")
    assert all(0.0 <= r["episodes_cut_rate"] <= 1.0 and r["episodes_cut_max_episode_tokens"] >= 0 for r in rows)
    assert 0.0 <= summary["cut_rate"] <= 1.0
    phases = {r["phase"] for r in read_metrics(run)}
    assert {"sft", "eval", "rl"} <= phases
    # each eval row keeps one reward per held-out task, so a before/after gain gets a paired error bar
    for row in read_metrics(run, phase="eval"):
        for kind in ("", "_sampled"):
            tasks = row[f"eval_task_rewards{kind}"]
            assert len(tasks) == 2 and row[f"eval_reward{kind}"] == pytest.approx(sum(tasks) / 2)
            assert row[f"eval_reward{kind}_se"] == pytest.approx(abs(tasks[0] - tasks[1]) / 2)
    # Ray's logs of both processes stay in the run after their temp dirs are gone
    logs = sorted((run / "ray_logs").iterdir())
    assert len(logs) == 2 and all(d.is_dir() and not d.is_symlink() and any(d.iterdir()) for d in logs)


def _settled(row: dict) -> float:
    return sum(row[f"episodes_{s}"] for s in ("consumed", "dropped_stale", "dropped_small_group", "failed"))


def test_every_episode_is_settled_once_across_processes(resumed):
    run, _, first_rows, summary = resumed
    assert_each_episode_settled_once(run, summary)
    # within one process every submitted episode is in flight, buffered or settled ...
    for row in first_rows:
        assert row["episodes_submitted"] == row["episodes_in_flight"] + row["episodes_buffered"] + _settled(row), row
    # ... and across a resume, episodes still running when the first process stopped are gone
    last = read_metrics(run, phase="rl")[-1]
    assert last["episodes_submitted"] >= last["episodes_in_flight"] + last["episodes_buffered"] + _settled(last)
    assert summary["trajectories_consumed"] == last["episodes_consumed"] == 4 * BATCH


def test_metrics_are_written_once_by_their_level(resumed):
    run, *_ = resumed
    rows = read_metrics(run, phase="rl")
    for r in rows:
        # the learner's reward (the one its advantages used) and the environments' reward are
        # both logged; with no length reward they agree
        assert r["reward_mean"] == pytest.approx(r["task_reward_mean"])
        assert r["tokens_per_s"] > 0 and r["wall_tokens_per_s"] > 0  # the learner's and the run's throughput
    assert [r["version"] for r in rows] == sorted({r["version"] for r in rows})  # versions strictly increase


def test_the_final_policy_is_the_learners_weights(resumed):
    """runs/<name>/policy, written by the learner, loads and holds exactly the weights of the
    learner's last checkpoint (taken after the last step)."""
    run, *_ = resumed
    policy = load_checkpoint(run / "policy")
    assert (run / "policy" / "tokenizer.json").is_file()
    want = learner_checkpoint_weights(run)
    got = policy.state_dict()
    assert set(want) <= set(got)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == []


def test_async_respects_the_staleness_bound(resumed):
    run, *_ = resumed
    rows = read_metrics(run, phase="rl")
    assert rows and all(r["staleness_max"] <= 2 for r in rows)  # quickstart's max_staleness
    for rec in TrajectoryArchive(run).records(status="consumed"):
        assert rec.staleness is None or rec.staleness <= 2


def test_resume_continues_and_trains_each_trajectory_once(resumed):
    run, first, first_rows, second = resumed
    assert first["rl_steps"] == 2 and second["rl_steps"] == 4
    # the second process logged only steps 3 and 4, continuing the first one's versions
    rows = read_metrics(run, phase="rl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["version"] == first_rows[-1]["version"] + 1
    # SFT and the pre-RL eval are not repeated on resume
    assert [r["step"] for r in read_metrics(run, phase="sft")] == [0, 1]  # one row per step, from chunked calls
    assert len(read_metrics(run, phase="eval")) == 3  # before, after (run 1), after (run 2)
    assert second["eval_reward_before_rl"] == first["eval_reward_before_rl"]
    assert_each_trained_once(run, steps=4)


def test_sync_mode_trains_only_fresh_samples(tmp_path):
    from actors.controller import train

    cfg = small_config(tmp_path, "sync", "schedule.mode=sync", "schedule.max_staleness=0", "learner.sft_steps=0",
                       "schedule.eval_before_rl=false", "environments.eval_seeds=[10000]")
    summary = train(cfg)
    rows = read_metrics(tmp_path / "sync", phase="rl")
    assert summary["rl_steps"] == 3 and len(rows) == 3
    assert [r["version"] for r in rows] == [1.0, 2.0, 3.0]  # the learner really stepped
    assert summary["mean_staleness"] == 0.0 and all(r["staleness_max"] == 0 for r in rows)
    assert summary["trajectories_dropped_stale"] == 0 and summary["mode"] == "sync"
    assert all(rec.staleness == 0 for rec in TrajectoryArchive(tmp_path / "sync").records(status="consumed"))
    assert_each_trained_once(tmp_path / "sync", steps=3)
    assert_each_episode_settled_once(tmp_path / "sync", summary)
    assert all(r["episodes_submitted"] == r["episodes_in_flight"] + r["episodes_buffered"] + _settled(r) for r in rows)


def test_the_archive_keeps_the_per_token_mismatch(resumed):
    """A real run (embedded engine recording routes, replay on) leaves per token the learner's own
    logprob, the loss's decision and the route flips in the archive, the flip rates in metrics.jsonl,
    and `kpop replay --rescore` reads it."""
    from typer.testing import CliRunner

    from kpop.cli.main import app

    run = resumed[0]
    rows = read_metrics(run, phase="rl")
    assert all(0.0 <= r["route_flip_rate"] <= 1.0 and "route_flip_rate_lightning" in r and "route_flip_rate_mla" in r
               for r in rows)
    consumed = TrajectoryArchive(run).records(status="consumed")
    assert consumed
    for rec in consumed:
        n = rec.trajectory.num_tokens
        assert len(rec.train_logprobs) == len(rec.decisions) == len(rec.route_flips) == n
        assert all(d == 4 for d, m in zip(rec.decisions, rec.trajectory.loss_mask) if not m)
    res = CliRunner().invoke(app, ["replay", str(run), "--rescore", "--kpop-phi", "0.5", "--icepop", "0.5,5"])
    assert res.exit_code == 0 and f"of {len(consumed)} trajectories" in res.stdout, res.output
