"""Rollout worker (plain and as supervised Ray actors) against real envs and a real Redis stream."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import pytest

from environments import ChatEnv, Resources, Task, Toolbox, assistant, register

from kpop.config import PolicyConfig, RolloutConfig
from kpop.policy.checkpoint import load_policy
from kpop.policy.tokenizer import get_tokenizer
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
                               run_id="run-p", weight_sync="object_store"), max_inflight_per_worker=3)
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
        from kpop.weight_sync import ObjectStoreSync

        pool.update_weights(ObjectStoreSync().publish({"lm_head.weight": model.lm_head.weight.detach() * 1.01}, 1))
        assert [ray.get(w.ping.remote())["version"] for w in pool.workers] == [1, 1]
    finally:
        pool.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


# -- envs for the worker's contracts -------------------------------------------------------------
class Scripted(ChatEnv):
    """Any final answer earns reward 1 (so grading cut text would look like success). `hang`:
    step and close block on HANG, as a tool stuck in a query and a close waiting for it do.
    `prompt_words` pads the task prompt. Counts verifier calls in VERIFIED."""

    HANG = threading.Event()
    VERIFIED: collections.Counter = collections.Counter()

    def __init__(self, hang: bool = False, prompt_words: int = 0):
        super().__init__()
        self.hang, self.prompt_words = hang, prompt_words

    def _new_task(self, rng, options):
        return Task(task_id=f"scripted/{int(rng.integers(1000))}", prompt="Say anything. " + "word " * self.prompt_words)

    def _toolbox(self, task):
        return Toolbox([])

    def _verify(self, final):
        Scripted.VERIFIED[self.prompt_words] += 1
        return 1.0, {"graded": (final or {}).get("content")}

    def oracle_action(self, messages):
        return assistant("anything")

    def step(self, action):
        if self.hang:
            Scripted.HANG.wait()
        return super().step(action)

    def close(self):
        if self.hang:
            Scripted.HANG.wait()


class Pooled(ChatEnv):
    """An env that runs its check in a sandbox from the pool it is given (`sandbox_pool`)."""

    POOLS: list = []

    def __init__(self, sandbox_pool=None):
        super().__init__()
        Pooled.POOLS.append(sandbox_pool)
        self.pool, self._lease = sandbox_pool, None

    def _new_task(self, rng, options):
        self._lease = self.pool.acquire()
        self.sandbox = self._lease.__enter__()
        return Task(task_id="pooled/0", prompt="Say anything.", resources=Resources(sandbox_backend="bwrap"))

    def _toolbox(self, task):
        return Toolbox([])

    def _verify(self, final):
        res = self.sandbox.exec(["sh", "-c", "echo $((6 * 7))"])
        return float(res.stdout.strip() == "42"), {}

    def oracle_action(self, messages):
        return assistant("anything")

    def close(self):
        if self._lease is not None:
            self._lease.__exit__(None, None, None)
            self._lease = None


register("test/scripted-v0", Scripted)
register("test/pooled-v0", Pooled)


def small_worker(**rollout: object) -> RolloutWorker:
    cfg = RolloutConfig(**{"max_new_tokens": 4, "max_turns": 1, "max_concurrent_episodes": 2,
                           "max_episode_tokens": 256, "temperature": 0.0, **rollout})
    return RolloutWorker(PolicyConfig(), cfg, None, run_id="contracts", step_timeout_s=0.5)


def test_a_hung_env_call_does_not_block_the_episodes_behind_it():
    """#14.4: a tool call that never returns fails its own episode; its env's close (which waits
    for that call) runs off the event loop, so a benign episode queued behind it still runs."""
    worker = small_worker(max_concurrent_episodes=1)  # the benign task waits for the hung one's slot
    hung = RolloutTask(env_id="test/scripted-v0", seed=0, group_id="g", env_kwargs={"hang": True})
    benign = RolloutTask(env_id="test/scripted-v0", seed=1, group_id="g")
    done: dict = {}

    def drive() -> None:
        async def both():
            done.update(zip(("hung", "benign"), await asyncio.gather(worker.run_task(hung), worker.run_task(benign))))

        asyncio.run(both())

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        thread.join(timeout=60)  # a liveness bound, not a timing: with the loop blocked it never ends
        assert done, "the benign episode never ran: the hung env blocked the worker's event loop"
        assert not Scripted.HANG.is_set()  # the hung calls were abandoned, not finished
        assert done["benign"].status == "ok" and done["benign"].reward == 1.0
        assert done["hung"].status == "failed" and "env step timed out" in done["hung"].error
    finally:
        Scripted.HANG.set()
        worker.close()


def test_episodes_cut_at_the_token_budget_are_truncated_not_graded(caplog):
    """#20: an episode cut at rollout.max_episode_tokens is 'truncated' with reward 0; the env's
    verifier (which would pass any text) never sees the cut reply; most cut -> a loud warning."""
    from kpop.rollout.worker import truncation_stats

    prompt_len = len(get_tokenizer().apply_chat_template(
        Scripted(prompt_words=40).reset(seed=0)[0], add_generation_prompt=True, tokenize=True)["input_ids"])
    worker = small_worker(max_new_tokens=16, max_episode_tokens=prompt_len + 3)
    tasks = [RolloutTask(env_id="test/scripted-v0", seed=s, group_id="g", env_kwargs={"prompt_words": 40})
             for s in range(3)]
    tasks.append(RolloutTask(env_id="test/scripted-v0", seed=9, group_id="g", env_kwargs={"prompt_words": 400}))
    Scripted.VERIFIED.clear()
    try:
        results = asyncio.run(worker.run_tasks(tasks))
    finally:
        worker.close()
    for r in results[:3]:  # room for 3 reply tokens: the reply is cut mid-way
        assert (r.status, r.reward, r.truncated_by) == ("truncated", 0.0, "max_episode_tokens"), r
        assert r.num_model_tokens == 3 and r.num_tokens == prompt_len + 3
        assert "max_total_tokens" in r.error
    long = results[3]  # the prompt alone does not fit: no reply at all
    assert (long.status, long.reward, long.num_model_tokens, long.truncated_by) == (
        "truncated", 0.0, 0, "max_episode_tokens")
    assert Scripted.VERIFIED == {}  # nothing was graded
    with caplog.at_level(logging.WARNING, logger="kpop.rollout.worker"):
        stats = truncation_stats(results, prompt_len + 3)
    assert stats == {"episodes": 4.0, "cut_max_episode_tokens": 4.0, "cut_max_turns": 0.0, "cut_rate": 1.0}
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"4 of 4 episodes (100%)" in warning and f"rollout.max_episode_tokens={prompt_len + 3}" in warning
    caplog.clear()
    ok = results[0].model_copy(update={"status": "ok", "truncated_by": None})
    assert truncation_stats([ok, ok, results[0]], 99)["cut_rate"] == pytest.approx(1 / 3)
    assert not caplog.records  # a minority cut: metrics, no warning


def test_the_worker_keeps_one_sandbox_pool_for_its_envs(monkeypatch):
    """#13: envs that take a `sandbox_pool` get the worker's pool (from the `sandbox:` config),
    so episodes reuse sandboxes; the declared sandbox reaches Trajectory.sandbox."""
    import sandboxes
    from kpop.config import SandboxConfig
    from kpop.trajectory import SandboxIdentity

    real, starts = sandboxes.create_sandbox, []

    def counting(*args, **kwargs):  # a spy: the real sandbox, counted
        starts.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sandboxes, "create_sandbox", counting)
    worker = RolloutWorker(PolicyConfig(), RolloutConfig(max_new_tokens=4, max_turns=1, max_concurrent_episodes=2),
                           None, run_id="pool", step_timeout_s=30.0,
                           sandbox=SandboxConfig(backend="bwrap", pool_size=2))
    Pooled.POOLS.clear()
    try:
        trajs = asyncio.run(worker.play([RolloutTask(env_id="test/pooled-v0", seed=s, group_id="g")
                                         for s in range(6)]))
        tooluse = asyncio.run(worker.play([RolloutTask(env_id=ENV, seed=0, group_id="g")]))
    finally:
        worker.close()
    assert [t.status for t in trajs] == ["ok"] * 6 and [t.reward for t in trajs] == [1.0] * 6
    assert len(Pooled.POOLS) == 6 and all(p is worker._pool for p in Pooled.POOLS)
    assert len(starts) == 2  # the pool's two warm sandboxes served all six episodes
    assert all(t.sandbox == SandboxIdentity(backend="bwrap", image="") for t in trajs)
    assert tooluse[0].sandbox is None and "sandbox_pool" not in tooluse[0].env_kwargs


def _coding_env_takes_a_pool() -> bool:
    import inspect

    from environments.coding import CodingEnv

    return "sandbox_pool" in inspect.signature(CodingEnv).parameters


@pytest.mark.skipif(not _coding_env_takes_a_pool(), reason="this CodingEnv has no sandbox_pool parameter yet")
def test_coding_episodes_reuse_the_workers_sandboxes(monkeypatch):
    """#13: a coding-env rollout through the worker does not start a sandbox per episode."""
    import sandboxes
    from kpop.config import SandboxConfig

    real, starts = sandboxes.create_sandbox, []

    def counting(*args, **kwargs):  # a spy: the real sandbox, counted
        starts.append(args + tuple(kwargs.values()))
        return real(*args, **kwargs)

    monkeypatch.setattr(sandboxes, "create_sandbox", counting)
    episodes, concurrent, pool_size = 8, 2, 2
    worker = RolloutWorker(PolicyConfig(), RolloutConfig(max_new_tokens=8, max_turns=1, max_concurrent_episodes=concurrent,
                                                         temperature=0.0),
                           None, run_id="coding", step_timeout_s=60.0,
                           sandbox=SandboxConfig(backend="bwrap", pool_size=pool_size))
    try:
        trajs = asyncio.run(worker.play([RolloutTask(env_id="kpop/coding-v0", seed=s, group_id="g",
                                                     env_kwargs={"source": "generated"}) for s in range(episodes)]))
    finally:
        worker.close()
    assert [t.status for t in trajs] == ["ok"] * episodes, [t.error for t in trajs]
    assert all(t.sandbox is not None and t.sandbox.backend == "bwrap" for t in trajs)
    # the env takes the `sandbox:` section's spec from the worker's pool: at most one sandbox per
    # concurrent episode (or warm one), however many episodes ran
    assert 1 <= len(starts) <= max(pool_size, concurrent) < episodes, starts
    assert all(s[2] == SandboxConfig(backend="bwrap", pool_size=pool_size).limits for s in starts), starts
