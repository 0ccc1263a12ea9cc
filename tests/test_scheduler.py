"""The schedule logic (kpop/scheduler.py): plain objects, tested directly."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import pytest

import environments.latency  # noqa: F401  registers kpop/latency-v0 (a bench helper, not a built-in)
from kpop.config import EnvSpec
from kpop.scheduler import Admission, BatchGate, GroupBuffer, StalenessBound, TaskSource
from kpop.trajectory import ArchiveStatus

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


# -- ArchiveStatus / StalenessBound / Admission / BatchGate ------------------------------------

def test_one_vocabulary_for_what_happened_to_a_trajectory():
    from kpop.archive import STATUSES

    assert STATUSES == ("consumed", "dropped_stale", "dropped_small_group", "failed")
    assert [d.value for d in ArchiveStatus] == list(STATUSES)
    assert ArchiveStatus("dropped_stale") is ArchiveStatus.DROPPED_STALE and f"{ArchiveStatus.FAILED}" == "failed"


def test_staleness_bound_is_the_one_rule():
    one = StalenessBound(1)
    assert not one.is_stale(min_version=4, current_version=5) and one.is_stale(3, 5)
    assert StalenessBound(0).is_stale(4, 5) and not StalenessBound(0).is_stale(5, 5)
    assert not StalenessBound(0).is_stale(None, 99)  # generated nothing: nothing in it is old
    assert one.window(batch_size=8) == 16 and StalenessBound(0).window(8) == 8
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessBound(-1)


def test_admission_caps_in_flight_plus_buffered_by_staleness():
    adm = Admission(batch_size=8, bound=StalenessBound(2))
    assert adm.capacity() == 24
    adm.submit(16)
    assert adm.capacity() == 8 and adm.in_flight == 16
    adm.finish(10)  # finished episodes still hold a slot until the learner settles them
    assert adm.capacity() == 8 and (adm.in_flight, adm.buffered) == (6, 10)
    adm.settle({"consumed": 8, "dropped_stale": 1})
    assert adm.capacity() == 17 and adm.buffered == 1
    adm.submit(30)
    assert adm.capacity() == 0  # never negative
    sync = Admission(batch_size=8, bound=StalenessBound(0))
    assert sync.capacity() == 8
    sync.submit(4)
    sync.finish(4)
    assert sync.capacity() == 4


def test_admission_counts_every_episode_once_and_survives_a_resume():
    adm = Admission(batch_size=4, bound=StalenessBound(1))
    adm.submit(8)
    adm.finish(8)
    adm.settle({ArchiveStatus.CONSUMED: 4, "failed": 1, "dropped_small_group": 1})
    c = adm.counters()
    assert c == {"submitted": 8, "in_flight": 0, "buffered": 2, "consumed": 4, "dropped_stale": 0,
                 "dropped_small_group": 1, "failed": 1}
    assert c["submitted"] == c["in_flight"] + c["buffered"] + sum(c[d.value] for d in ArchiveStatus)
    with pytest.raises(ValueError, match="in flight"):
        adm.finish(1)
    with pytest.raises(ValueError, match="not a valid ArchiveStatus"):
        adm.settle({"dropped_failed": 1})  # the old, second name of "failed"

    resumed = Admission(batch_size=4, bound=StalenessBound(1))  # a new process
    resumed.load_totals(adm.totals())
    assert resumed.submitted == 8 and resumed.settled == adm.settled
    assert (resumed.in_flight, resumed.buffered) == (0, 0)  # the old process's episodes hold no slot
    resumed.settle({"consumed": 4})  # its learner settles what the old process finished
    assert resumed.buffered == 0 and resumed.settled[ArchiveStatus.CONSUMED] == 8

    # a learner restart inside a process: its decisions roll back, this process's submissions stand
    adm.submit(4)
    adm.load_totals({"submitted": 0, "settled": {"consumed": 4}}, settled_only=True)
    adm.forget_buffered()
    assert adm.submitted == 12 and adm.settled == {ArchiveStatus.CONSUMED: 4} and adm.buffered == 0


def test_batch_gate_counts_trajectories_or_tokens():
    gate = BatchGate(batch_size=8, token_budget=0)
    assert not gate.ready(7, 10**6) and gate.ready(8, 0)
    tok = BatchGate(batch_size=8, token_budget=100)
    assert not tok.ready(50, 99) and tok.ready(1, 100)


# -- GroupBuffer --------------------------------------------------------------------------------

def _buffer(group_size: int, batch_size: int, max_staleness: int, token_budget: int = 0) -> GroupBuffer:
    return GroupBuffer(group_size, BatchGate(batch_size, token_budget), StalenessBound(max_staleness))


def _fill(buf: GroupBuffer, gid: str, n: int, **kw) -> list[str]:
    ids = [f"{gid}-{i}" for i in range(n)]
    for e in ids:
        buf.add(e, Traj(gid, **kw))
    return ids


def test_group_buffer_returns_complete_groups_only_and_keeps_leftovers():
    buf = _buffer(4, 8, 2)
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
    buf = _buffer(4, 3, 1)
    for i in range(4):  # one failed member: the group still trains with 3
        buf.add(f"a-{i}", Traj("a", status="failed" if i == 0 else "ok", min_policy_version=5))
    for i in range(4):  # three stale members: one usable left, no baseline -> small_group
        buf.add(f"b-{i}", Traj("b", min_policy_version=3 if i < 3 else 5))
    batch, dropped = buf.pop_batch(version=5)
    reasons = collections.Counter(r for _, _, r in dropped)
    assert reasons == {ArchiveStatus.FAILED: 1, ArchiveStatus.DROPPED_STALE: 3, ArchiveStatus.DROPPED_SMALL_GROUP: 1}
    assert sorted(e for e, _ in batch) == ["a-1", "a-2", "a-3"]
    assert {e for e, _, _ in dropped} | {e for e, _ in batch} == {f"{g}-{i}" for g in "ab" for i in range(4)}
    assert len(buf) == 0


def test_group_buffer_rechecks_staleness_of_waiting_groups():
    buf = _buffer(2, 4, 0)
    _fill(buf, "a", 2, min_policy_version=0)
    assert buf.pop_batch(version=0) == ([], [])
    batch, dropped = buf.pop_batch(version=1)  # the policy moved on while group a waited
    assert batch == [] and [r for _, _, r in dropped] == [ArchiveStatus.DROPPED_STALE] * 2 and len(buf) == 0


def test_group_buffer_gate_by_token_budget():
    buf = _buffer(2, 1000, 2, token_budget=50)
    _fill(buf, "a", 2, num_tokens=20)
    assert buf.pop_batch(0) == ([], [])  # 40 tokens < 50
    _fill(buf, "b", 2, num_tokens=20)
    _fill(buf, "c", 2, num_tokens=20)
    batch, _ = buf.pop_batch(0)
    assert [t.group_id for _, t in batch] == ["a", "a", "b", "b"]  # whole groups, stop once >= 50
    assert len(buf) == 2


def test_group_buffer_without_version_is_never_stale():
    buf = _buffer(2, 2, 0)
    _fill(buf, "a", 2, min_policy_version=None)  # e.g. an episode that generated nothing
    batch, dropped = buf.pop_batch(version=9)
    assert len(batch) == 2 and dropped == []


# -- kpop/latency-v0: the long-tailed workload the schedule is benchmarked on --------------------

def test_latency_env_is_the_inner_env_with_long_tailed_waits():
    from environments import make, oracle_agent, run_episode

    env = make("kpop/latency-v0", inner="kpop/tooluse-v0", inner_kwargs={"difficulty": 0},
               fast_s=0.0, slow_s=0.01, p_slow=0.5, sigma=0.0)
    classes = []
    for seed in range(12):
        ep = asyncio.run(run_episode(env, oracle_agent(env), seed=seed))
        assert ep.status == "ok" and ep.reward == 1.0  # the inner env's tools, oracle and verifier
        env.reset(seed=seed)
        classes.append(env.slow)
        assert env.next_delay() == (0.01 if env.slow else 0.0)  # each step of a slow episode waits slow_s
    assert any(classes) and not all(classes)
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


def _awaiting(task: asyncio.Task) -> list[str]:
    """Names of the coroutines `task` is suspended in, outermost first."""
    names, coro = [], task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_name)
        coro = coro.cr_await
    return names


async def _started_slow_steps(n: int) -> list[list[str]]:
    """Start n slow steps, take the event loop back once, report where each step is suspended."""
    from environments import make

    envs = [make("kpop/latency-v0", inner="kpop/tooluse-v0", slow_s=1.0, p_slow=1.0, sigma=0.0) for _ in range(n)]
    for i, e in enumerate(envs):
        await e.areset(seed=i)
    steps = [asyncio.create_task(e.astep(e.oracle_action(e.inner.transcript))) for e in envs]
    await asyncio.sleep(0)  # every step runs up to its first suspension
    where = [_awaiting(t) for t in steps]
    for t in steps:
        t.cancel()
    await asyncio.gather(*steps, return_exceptions=True)
    return where


def test_latency_env_waits_do_not_block_each_other():
    # behaviour, not a stopwatch: when the loop gets control back, all 8 steps are waiting in
    # asyncio.sleep (a blocking wait would have finished there and moved on to the inner step)
    assert asyncio.run(_started_slow_steps(8)) == [["astep", "sleep"]] * 8
