"""Rollout worker (plain and as supervised Ray actors) against real envs and a real Redis stream."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kpop.config import PolicyConfig, RolloutConfig
from kpop.policy.checkpoint import load_policy
from kpop.redis_server import EmbeddedRedis
from kpop.rollout.worker import RolloutTask, RolloutWorker
from kpop.stream import StreamSpec
from logprob_check import trajectory_consistency

ENV = "kpop/tooluse-v0"
ROLLOUT = RolloutConfig(max_new_tokens=12, max_turns=2, max_concurrent_episodes=4, max_episode_tokens=1024)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server.url
    server.stop()


def drain(spec: StreamSpec, key_count: int, timeout_s: float = 30.0):
    stream = spec.open(consumer="test-learner")
    got, deadline = {}, time.time() + timeout_s
    while len(got) < key_count and time.time() < deadline:
        for entry_id, traj in stream.get(16, block_ms=200):
            got[traj.trajectory_id] = traj
            stream.ack([entry_id])
    stream.close()
    return got


def check_consistent(trajs) -> float:
    """The learner's full forward (same policy config -> same weights) over each trajectory
    reproduces its rollout logprobs on the model tokens."""
    model, _ = load_policy(PolicyConfig(), seed=0)
    worst = 0.0
    for t in trajs:
        m = trajectory_consistency(model, t, phi=0.1)
        assert m["kpop_mask_rate"] == 0.0
        worst = max(worst, m["logprob_delta_max"])
    return worst


def test_worker_writes_consistent_trajectories(redis_url):
    spec = StreamSpec(url=redis_url, key="kpop:test-worker")
    worker = RolloutWorker(PolicyConfig(), ROLLOUT, spec, run_id="run-w")
    tasks = [RolloutTask(env_id=ENV, seed=s, group_id="g0", env_kwargs={"difficulty": 0}) for s in range(3)]

    async def run():
        results = await worker.run_tasks(tasks)
        # a task that needs a newer policy waits for it
        later = asyncio.ensure_future(worker.run_task(RolloutTask(env_id=ENV, seed=9, group_id="g1", policy_version=1,
                                                                  env_kwargs={"difficulty": 0})))
        await asyncio.sleep(0.5)
        assert not later.done()
        await worker.update_weights({}, 1)
        return results, await asyncio.wait_for(later, 60)

    try:
        results, later = asyncio.run(run())
    finally:
        worker.close()
    assert [r.task_id for r in results] == [t.task_id for t in tasks]
    assert later.min_version == 1
    trajs = drain(spec, 4)
    assert set(trajs) == {t.task_id for t in tasks} | {later.task_id}
    for t in trajs.values():
        assert t.run_id == "run-w" and t.env_id == ENV and t.num_model_tokens > 0
        assert t.messages[0]["role"] in ("system", "user") and t.messages[-1]["role"] in ("assistant", "tool")
        assert all(t.loss_mask[s] == 1 for seg in t.segments for s in range(seg.start, seg.end))
        assert sum(seg.end - seg.start for seg in t.segments) == t.num_model_tokens
        assert t.status in ("ok", "truncated") and t.timings["agent_s"] > 0
    assert {t.trajectory_id: t.group_id for t in trajs.values()}[tasks[0].task_id] == "g0"
    assert check_consistent(trajs.values()) < 1e-4


@pytest.mark.slow
def test_pool_replaces_dead_worker_and_reissues_its_tasks(redis_url):
    import shutil
    import sys
    import tempfile

    import ray

    from actors.rollout_pool import RolloutPool

    ray_dir = tempfile.mkdtemp(prefix="kray", dir="/tmp")  # AF_UNIX paths must stay < 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}})
    spec = StreamSpec(url=redis_url, key="kpop:test-pool")
    pool = RolloutPool(2, dict(policy=PolicyConfig().model_dump(), rollout=ROLLOUT.model_dump(), stream=spec,
                               run_id="run-p"), max_inflight_per_worker=3)
    try:
        tasks = [RolloutTask(env_id=ENV, seed=s, group_id=f"g{s // 2}", env_kwargs={"difficulty": 0}) for s in range(8)]
        pool.submit(tasks)
        results = []
        while not results:  # both workers are up once results flow
            results += pool.poll(timeout_s=5)
        victim = max(range(2), key=pool.inflight)
        assert pool.inflight(victim) > 0
        ray.kill(pool.workers[victim], no_restart=True)
        deadline = time.time() + 300
        while pool.pending() and time.time() < deadline:
            results += pool.poll(timeout_s=2)
        assert pool.restarts == 1 and pool.reissued >= 1
        assert sorted(r.task_id for r in results) == sorted(t.task_id for t in tasks)
        trajs = drain(spec, len(tasks))
        assert set(trajs) == {t.task_id for t in tasks}
        # weights broadcast reaches the replacement too
        model, _ = load_policy(PolicyConfig(), seed=0)
        pool.update_weights({"lm_head.weight": model.lm_head.weight.detach() * 1.01}, 1)
        assert [ray.get(w.ping.remote())["version"] for w in pool.workers] == [1, 1]
    finally:
        pool.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
