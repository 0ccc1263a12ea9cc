"""Helpers shared by the tests that run the controller end to end (test_controller, test_faults)."""

from __future__ import annotations

import collections
from pathlib import Path

import torch

from kpop.archive import STATUSES, TrajectoryArchive
from kpop.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
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


def assert_each_episode_settled_once(run_dir: Path, summary: dict) -> None:
    """Every archived trajectory has exactly one disposition, the archive and the run's counters
    agree on each, and nothing was settled that was not submitted."""
    rows = TrajectoryArchive(run_dir).index()
    ids = collections.Counter(r["trajectory_id"] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == [], "a trajectory was settled twice"
    by_status = collections.Counter(r["status"] for r in rows)
    assert set(by_status) <= set(STATUSES)
    for status in STATUSES:
        assert summary[f"trajectories_{status}"] == by_status[status], (status, summary, by_status)
    assert sum(by_status.values()) <= summary["episodes_submitted"]


def learner_checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights in the learner's newest DeepSpeed checkpoint."""
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    return states["module"]
