"""The controller end to end (actors/controller.py): real Ray, embedded Redis, DeepSpeed learner,
embedded rollout engine, on a tiny config. Runs are shared between assertions (module fixtures):
each costs ~40-70 s on 2 cores, mostly Ray, learner and engine start-up."""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import pytest

from kpop.archive import TrajectoryArchive
from kpop.config import RunConfig, load_config
from kpop.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"reward_first", "reward_last", "eval_reward_before_rl", "eval_reward_after_rl", "rl_steps",
                "trajectories_consumed", "trajectories_dropped_stale", "mean_staleness", "kpop_mask_rate", "wall_s"}
BATCH = 8


def small_config(run_dir: Path, name: str, *overrides: str) -> RunConfig:
    """configs/quickstart.yaml shrunk to seconds per phase. dynamic_filter off: an untrained policy
    earns reward 0 everywhere, and the learner must still step so versions (and staleness) move."""
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"name={name}", f"run_dir={run_dir}", "learner.sft_steps=2", "learner.sft_batch_size=4",
        "schedule.rl_steps=3", f"schedule.batch_size={BATCH}", "rollout.group_size=4",
        "policy.preset=tiny", "environments.eval_seeds=[10000,10001]", "schedule.eval_samples=1",
        "logging.tensorboard=false", "logging.progress=false",
        "learner.checkpoint_every=1", "algorithm.dynamic_filter=false", *overrides])


def consumed_ids(run_dir: Path) -> list[str]:
    return [r["trajectory_id"] for r in TrajectoryArchive(run_dir).index(status="consumed")]


def assert_each_trained_once(run_dir: Path, steps: int) -> None:
    """No trajectory trained twice, none lost: exactly steps x batch consumed, all distinct, whole groups."""
    ids = consumed_ids(run_dir)
    twice = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not twice, f"trained twice: {twice}"
    assert len(ids) == steps * BATCH
    groups = collections.Counter(r.trajectory.group_id for r in TrajectoryArchive(run_dir).records(status="consumed"))
    assert set(groups.values()) == {4}, groups


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
    assert (run / "policy" / "config.json").is_file() and any((run / "policy").glob("*.safetensors"))
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["rl_steps"] == 4
    assert summary["trajectories_consumed"] == 4 * BATCH and summary["mode"] == "async"
    for key in ("reward_first", "reward_last", "eval_reward_before_rl", "eval_reward_after_rl",
                "eval_reward_sampled_before_rl", "eval_reward_sampled_after_rl"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["mean_staleness"] is not None and summary["wall_s"] > 0
    phases = {r["phase"] for r in read_metrics(run)}
    assert {"sft", "eval", "rl"} <= phases


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
    assert len(read_metrics(run, phase="sft")) == 2
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
