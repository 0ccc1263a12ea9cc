"""The colocated loop (actors/colocate.py) end to end on CPU: rollout workers, the learner service, the
embedded Redis stream and the same-process weight sync in one process, no Ray, on the tiny policy."""

from __future__ import annotations

import json

import pytest
import torch

from kpop.archive import TrajectoryArchive
from kpop.metrics import read_metrics
from train_helpers import BATCH, ROOT, assert_each_episode_settled_once, assert_each_trained_once, small_config

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from actors.colocate import ColocatedLoop

    base = tmp_path_factory.mktemp("runs")
    # max_staleness 1: the learner must drop what is older, and versions move every step
    cfg = small_config(base, "colo", f"schedule.rl_steps={STEPS}", "schedule.max_staleness=1",
                       "learner.sync_bucket_mb=1")
    loop = ColocatedLoop(cfg)
    try:
        summary = loop.run()
        # after the last sync, every engine holds exactly the learner's weights
        with loop.learner.learner.weights() as learned:
            learned = {k: v.clone() for k, v in learned.items()}
        engines = [dict(w.engine.model.state_dict()) for w in loop.workers]
        versions = [w.engine.version for w in loop.workers]
        learner_version = loop.learner.version
        buckets = len(loop.sync.buffers)
    finally:
        loop.close()
    return base / "colo", summary, learned, engines, versions, learner_version, buckets


def test_trains_with_reward_and_staleness_logged(run):
    run_dir, summary, *_ = run
    rows = read_metrics(run_dir, phase="rl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert 0.0 <= r["task_reward_mean"] <= 1.0 and r["staleness_mean"] >= 0.0 and r["staleness_max"] <= 1
        assert r["sync_s"] > 0 and r["engine_version"] == r["version"]
    assert summary["rl_steps"] == STEPS and summary["layout"] == "colocated"
    assert summary["trajectories_consumed"] == STEPS * BATCH
    assert json.loads((run_dir / "summary.json").read_text())["rl_steps"] == STEPS
    assert (run_dir / "policy" / "config.json").is_file()
    assert {"sft", "eval", "rl"} <= {r["phase"] for r in read_metrics(run_dir)}
    assert_each_trained_once(run_dir, STEPS)
    assert_each_episode_settled_once(run_dir, summary)
    # the staleness bound: nothing trained on was generated more than 1 version behind its step
    rows = TrajectoryArchive(run_dir).index(status="consumed")
    assert rows and all(r["staleness"] <= 1 for r in rows)


def test_engine_versions_advance_and_weights_are_bit_identical(run):
    _, _, learned, engines, versions, learner_version, buckets = run
    assert learner_version > STEPS  # SFT steps, then the RL steps
    assert versions == [learner_version]
    assert buckets > 1  # 1 MB buckets: the tiny policy's weights move in several
    for engine in engines:
        assert set(engine) == set(learned)
        for name, want in learned.items():
            assert torch.equal(engine[name].to(want.dtype), want), name


def test_the_colocated_loop_imports_no_ray():
    import subprocess
    import sys

    code = "import sys, actors.colocate, kpop.cli.train; assert 'ray' not in sys.modules, 'ray imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_cli_offers_colocate():
    from typer.testing import CliRunner

    from kpop.cli.main import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--colocate" in out.output and "without Ray" in out.output
    config = str(ROOT / "configs/quickstart.yaml")
    both = CliRunner().invoke(app, ["train", config, "--colocate", "--ray-address", "auto"])
    assert both.exit_code == 2 and "--colocate runs without Ray" in both.output


def test_rerunning_resumes_from_the_newest_checkpoint(run):
    from actors.colocate import ColocatedLoop

    run_dir, first, *_ = run
    loop = ColocatedLoop(small_config(run_dir.parent, "colo", f"schedule.rl_steps={STEPS + 1}",
                                      "schedule.max_staleness=1", "learner.sync_bucket_mb=1"))
    try:
        summary = loop.run()
    finally:
        loop.close()
    rows = read_metrics(run_dir, phase="rl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 2))  # SFT and steps 1-3 were not redone
    assert summary["rl_steps"] == STEPS + 1 and summary["eval_reward_before_rl"] == first["eval_reward_before_rl"]
    assert len([r for r in read_metrics(run_dir, phase="sft")]) == 2
    assert_each_trained_once(run_dir, STEPS + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_colocated_on_one_gpu(tmp_path):
    """Engine and learner on the GPU: weights move GPU to GPU (the buckets live there) and arrive
    bit-identical; reward and staleness are logged for every step."""
    from actors.colocate import ColocatedLoop

    cfg = small_config(tmp_path, "gpu", "schedule.rl_steps=3", "learner.sft_steps=0", "schedule.eval_before_rl=false",
                       "policy.dtype=bfloat16", "learner.dtype=bfloat16", "learner.num_gpus=1", "rollout.num_gpus=1",
                       "rollout.gpu_memory_fraction=0.3", "learner.sync_bucket_mb=1")
    loop = ColocatedLoop(cfg)
    try:
        summary = loop.run()
        assert all(b.is_cuda for b in loop.sync.buffers)
        with loop.learner.learner.weights() as learned:
            engine = dict(loop.workers[0].engine.model.state_dict())
            assert next(iter(learned.values())).is_cuda
            for name, want in learned.items():  # exactly what the engine's dtype can hold of them
                assert torch.equal(engine[name], want.to(engine[name].dtype)), name
        assert loop.workers[0].engine.version == loop.learner.version == 3
    finally:
        loop.close()
    rows = read_metrics(tmp_path / "gpu", phase="rl")
    assert len(rows) == 3 and all("task_reward_mean" in r and r["staleness_mean"] >= 0 for r in rows)
    assert summary["trajectories_consumed"] == 3 * BATCH
