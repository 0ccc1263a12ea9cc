"""The controller's schedule logic (kpop/scheduler.py): pure functions of their inputs, tested directly."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import pytest

import environments.latency  # noqa: F401  registers kpop/latency-v0 (a bench helper, not a built-in)
from kpop.config import EnvSpec
from kpop.scheduler import Admission, BatchGate, GroupBuffer, TaskSource

ENVS = [EnvSpec(id="kpop/tooluse-v0", weight=3.0), EnvSpec(id="kpop/search-v0", weight=1.0, kwargs={"k": 1})]


@dataclass
class Traj:
    """The four fields GroupBuffer reads from a kpop.trajectory.Trajectory."""

    group_id: str
    num_tokens: int = 10
    status: str = "ok"
    min_policy_version: int | None = 0


# -- TaskSource ---------------------------------------------------------------------------------

def test_task_source_is_deterministic_and_groups_share_a_task():
    a, b = TaskSource(ENVS, 4, seed=7), TaskSource(ENVS, 4, seed=7)
    ga, gb = [a.next_group() for _ in range(20)], [b.next_group() for _ in range(20)]
    assert ga == gb
    for i, group in enumerate(ga):
        assert len(group) == 4 and [t.index_in_group for t in group] == [0, 1, 2, 3]
        assert len({(t.env_id, t.seed, t.group_id) for t in group}) == 1 and group[0].group_id == f"g{i}"
    other = TaskSource(ENVS, 4, seed=8)
    assert [other.next_group()[0].seed for _ in range(20)] != [g[0].seed for g in ga]  # the seed matters


def test_task_source_resumes_from_its_counter():
    full = TaskSource(ENVS, 2, seed=3)
    groups = [full.next_group() for _ in range(10)]
    first = TaskSource(ENVS, 2, seed=3)
    for _ in range(4):
        first.next_group()
    resumed = TaskSource(ENVS, 2, seed=3, counter=first.state()["counter"])
    assert [resumed.next_group() for _ in range(6)] == groups[4:]


def test_task_source_follows_weights_and_kwargs():
    src = TaskSource(ENVS, 1, seed=0)
    tasks = [src.next_group()[0] for _ in range(2000)]
    share = collections.Counter(t.env_id for t in tasks)["kpop/tooluse-v0"] / len(tasks)
    assert 0.70 < share < 0.80  # weight 3:1
    assert all(t.env_kwargs == {"k": 1} for t in tasks if t.env_id == "kpop/search-v0")


def test_task_source_needs_an_environment():
    with pytest.raises(ValueError, match="at least one environment"):
        TaskSource([], 4, seed=0)


# -- Admission / BatchGate ----------------------------------------------------------------------

def test_admission_caps_in_flight_by_staleness():
    async_ = Admission(batch_size=8, max_staleness=2)
    assert async_.capacity(in_flight=0, buffered=0) == 24
    assert async_.capacity(in_flight=10, buffered=6) == 8
    assert async_.capacity(in_flight=30, buffered=0) == 0  # never negative
    sync = Admission(batch_size=8, max_staleness=0)
    assert sync.capacity(0, 0) == 8 and sync.capacity(4, 4) == 0


def test_batch_gate_count_token_and_staleness():
    gate = BatchGate(batch_size=8, token_budget=0, max_staleness=1)
    assert not gate.ready(7, 10**6) and gate.ready(8, 0)
    tok = BatchGate(batch_size=8, token_budget=100, max_staleness=1)
    assert not tok.ready(50, 99) and tok.ready(1, 100)
    assert not gate.is_stale(min_version=4, current_version=5) and gate.is_stale(3, 5)
    assert BatchGate(8, 0, 0).is_stale(4, 5) and not BatchGate(8, 0, 0).is_stale(5, 5)


# -- GroupBuffer --------------------------------------------------------------------------------

def _fill(buf: GroupBuffer, gid: str, n: int, **kw) -> list[str]:
    ids = [f"{gid}-{i}" for i in range(n)]
    for e in ids:
        buf.add(e, Traj(gid, **kw))
    return ids


def test_group_buffer_returns_complete_groups_only_and_keeps_leftovers():
    buf = GroupBuffer(group_size=4, gate=BatchGate(batch_size=8, token_budget=0, max_staleness=2))
    _fill(buf, "a", 4)
    _fill(buf, "b", 3)  # incomplete
    assert buf.pop_batch(version=0) == ([], [])  # one complete group < batch of 8
    assert len(buf) == 7
    _fill(buf, "b", 1)
    _fill(buf, "c", 4)
    batch, dropped = buf.pop_batch(version=0)
    assert dropped == [] and {t.group_id for _, t in batch} == {"a", "b"} and len(batch) == 8
    assert len(buf) == 4  # group c waits for the next step
    batch, _ = buf.pop_batch(version=0)
    assert batch == []
    _fill(buf, "d", 4)
    batch, _ = buf.pop_batch(version=0)
    assert [t.group_id for _, t in batch] == ["c"] * 4 + ["d"] * 4  # oldest first
    assert len(buf) == 0


def test_group_buffer_drops_stale_failed_and_small_groups_with_reasons():
    buf = GroupBuffer(group_size=4, gate=BatchGate(batch_size=3, token_budget=0, max_staleness=1))
    for i in range(4):  # one failed member: the group still trains with 3
        buf.add(f"a-{i}", Traj("a", status="failed" if i == 0 else "ok", min_policy_version=5))
    for i in range(4):  # three stale members: one usable left, no baseline -> small_group
        buf.add(f"b-{i}", Traj("b", min_policy_version=3 if i < 3 else 5))
    batch, dropped = buf.pop_batch(version=5)
    reasons = collections.Counter(r for _, _, r in dropped)
    assert reasons == {"failed": 1, "stale": 3, "small_group": 1}
    assert sorted(e for e, _ in batch) == ["a-1", "a-2", "a-3"]
    assert {e for e, _, _ in dropped} | {e for e, _ in batch} == {f"{g}-{i}" for g in "ab" for i in range(4)}
    assert len(buf) == 0


def test_group_buffer_rechecks_staleness_of_waiting_groups():
    buf = GroupBuffer(group_size=2, gate=BatchGate(batch_size=4, token_budget=0, max_staleness=0))
    _fill(buf, "a", 2, min_policy_version=0)
    assert buf.pop_batch(version=0) == ([], [])
    batch, dropped = buf.pop_batch(version=1)  # the policy moved on while group a waited
    assert batch == [] and sorted(r for _, _, r in dropped) == ["stale", "stale"] and len(buf) == 0


def test_group_buffer_gate_by_token_budget():
    buf = GroupBuffer(group_size=2, gate=BatchGate(batch_size=1000, token_budget=50, max_staleness=2))
    _fill(buf, "a", 2, num_tokens=20)
    assert buf.pop_batch(0) == ([], [])  # 40 tokens < 50
    _fill(buf, "b", 2, num_tokens=20)
    _fill(buf, "c", 2, num_tokens=20)
    batch, _ = buf.pop_batch(0)
    assert [t.group_id for _, t in batch] == ["a", "a", "b", "b"]  # whole groups, stop once >= 50
    assert len(buf) == 2


def test_group_buffer_without_version_is_never_stale():
    buf = GroupBuffer(group_size=2, gate=BatchGate(batch_size=2, token_budget=0, max_staleness=0))
    _fill(buf, "a", 2, min_policy_version=None)  # e.g. an episode that generated nothing
    batch, dropped = buf.pop_batch(version=9)
    assert len(batch) == 2 and dropped == []


# -- kpop/latency-v0: the long-tailed workload the schedule is benchmarked on --------------------

def test_latency_env_is_the_inner_env_with_long_tailed_waits():
    import asyncio
    import time

    from environments import make, oracle_agent, run_episode

    env = make("kpop/latency-v0", inner="kpop/tooluse-v0", inner_kwargs={"difficulty": 0},
               fast_s=0.0, slow_s=0.2, p_slow=0.5, sigma=0.0)
    classes, waits = [], []
    for seed in range(12):
        t0 = time.perf_counter()
        ep = asyncio.run(run_episode(env, oracle_agent(env), seed=seed))
        waits.append(time.perf_counter() - t0)
        classes.append(env.slow)
        assert ep.status == "ok" and ep.reward == 1.0  # the inner env's tools, oracle and verifier
    assert any(classes) and not all(classes)
    slow = min(w for w, s in zip(waits, classes) if s)
    fast = max(w for w, s in zip(waits, classes) if not s)
    assert slow >= 0.2 > fast  # each step of a slow episode waits slow_s
    env.reset(seed=3)
    again = env.slow
    env.reset(seed=3)
    assert env.slow == again  # the episode's class follows the seed


def test_latency_env_rejects_bad_parameters():
    from environments import make

    with pytest.raises(ValueError, match="p_slow"):
        make("kpop/latency-v0", p_slow=1.5)
    with pytest.raises(ValueError, match="cannot wrap itself"):
        make("kpop/latency-v0", inner="kpop/latency-v0")


async def _concurrent_slow_steps(n: int) -> float:
    import time

    from environments import make

    envs = [make("kpop/latency-v0", inner="kpop/tooluse-v0", slow_s=0.3, p_slow=1.0, sigma=0.0) for _ in range(n)]
    for i, e in enumerate(envs):
        await e.areset(seed=i)
    t0 = time.perf_counter()
    await asyncio.gather(*(e.astep(e.oracle_action(e.inner.transcript)) for e in envs))
    return time.perf_counter() - t0


def test_latency_env_waits_do_not_block_each_other():
    assert asyncio.run(_concurrent_slow_steps(8)) < 0.3 * 3  # 8 waits overlap on one event loop
