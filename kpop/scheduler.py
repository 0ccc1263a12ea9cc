"""The schedule of a run, as plain logic (no Ray, no I/O) so it can be tested directly.

- What finally happened to a finished trajectory (trained on, or why not) is one vocabulary,
  `kpop.trajectory.ArchiveStatus`: the learner's report, the admission counters, the metrics and
  the archive all use it.
- `TaskSource`: a seeded, resumable stream of tasks; each task is sampled `group_size` times
  (one GRPO/RLOO group), environments drawn by their configured weights.
- `StalenessBound`: the one place the staleness rule lives; the controller sizes admission with
  it and the learner drops samples with it.
- `Admission`: how many episodes may be started now, and the counters behind that answer
  (submitted, in flight, buffered, settled by disposition).
- `BatchGate`: decides when the learner steps (a batch of trajectories, or a token budget).
- `GroupBuffer`: holds finished trajectories until their group is complete.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Mapping

from kpop.config import EnvSpec
from kpop.trajectory import ArchiveStatus


@dataclass(frozen=True)
class Task:
    env_id: str
    seed: int
    group_id: str
    index_in_group: int
    env_kwargs: dict = field(default_factory=dict, hash=False, compare=False)


class TaskSource:
    """Deterministic given (seed, counter): a resumed run continues where it stopped."""

    def __init__(self, envs: list[EnvSpec], group_size: int, seed: int, counter: int = 0) -> None:
        if not envs:
            raise ValueError("TaskSource needs at least one environment")
        self.envs = envs
        self.group_size = group_size
        self.seed = seed
        self.counter = counter  # groups handed out so far

    def next_group(self) -> list[Task]:
        rng = random.Random(f"{self.seed}:{self.counter}")
        spec = rng.choices(self.envs, weights=[e.weight for e in self.envs])[0]
        task_seed = rng.randrange(2**31)
        group_id = f"g{self.counter}"
        self.counter += 1
        return [Task(spec.id, task_seed, group_id, i, spec.kwargs) for i in range(self.group_size)]

    def state(self) -> dict:
        return {"counter": self.counter}


@dataclass(frozen=True)
class StalenessBound:
    """A sample may train only if the policy moved at most `max_staleness` versions since the
    oldest token of it was generated; sync RL is `max_staleness=0`."""

    max_staleness: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    def is_stale(self, min_version: int | None, current_version: int) -> bool:
        """`min_version` None: the episode generated nothing, so nothing in it can be stale."""
        return min_version is not None and current_version - min_version > self.max_staleness

    def window(self, batch_size: int) -> int:
        """Episodes that may be admitted and not yet settled: with at most this many ahead of the
        learner, an episode admitted now is consumed within `max_staleness` steps unless its
        environment is slow (then the learner's `is_stale` drops it)."""
        return (self.max_staleness + 1) * batch_size


@dataclass
class Admission:
    """The controller's admission control and the counters it decides by.

    Run totals (`submitted`, `settled`) survive a resume through `totals()` / `load_totals()`.
    `in_flight` and `buffered` describe this process only: episodes of a crashed process are
    either in the stream (re-read by the learner) or gone, so they do not hold a slot.
    """

    batch_size: int
    bound: StalenessBound
    submitted: int = 0  # episodes handed to rollout, whole run
    settled: collections.Counter = field(default_factory=collections.Counter)  # ArchiveStatus -> n, whole run
    in_flight: int = 0  # this process: submitted, rollout not finished
    buffered: int = 0  # this process: rollout finished, the learner has not settled it yet

    def capacity(self) -> int:
        return max(0, self.bound.window(self.batch_size) - self.in_flight - self.buffered)

    def submit(self, n: int) -> None:
        self.submitted += n
        self.in_flight += n

    def finish(self, n: int) -> None:
        """`n` episodes left rollout (each one is on the stream, whatever its status)."""
        if n > self.in_flight:
            raise ValueError(f"{n} episodes finished but only {self.in_flight} were in flight")
        self.in_flight -= n
        self.buffered += n

    def settle(self, counts: Mapping[str, int]) -> None:
        """The learner's report of what it did with finished episodes (ArchiveStatus value -> n)."""
        n = 0
        for key, k in counts.items():
            self.settled[ArchiveStatus(key)] += k
            n += k
        # clamped: a resumed learner also settles episodes an earlier process finished
        self.buffered = max(0, self.buffered - n)

    def forget_buffered(self) -> None:
        """The learner restarted: what it had buffered is re-read from the stream and settled
        again from its checkpoint's counts, so it no longer holds a slot here."""
        self.buffered = 0

    def counters(self) -> dict[str, int]:
        return {"submitted": self.submitted, "in_flight": self.in_flight, "buffered": self.buffered,
                **{d.value: self.settled[d] for d in ArchiveStatus}}

    def totals(self) -> dict:
        return {"submitted": self.submitted, "settled": {d.value: self.settled[d] for d in ArchiveStatus}}

    def load_totals(self, totals: Mapping, *, settled_only: bool = False) -> None:
        """Restore run totals saved by `totals()`. `settled_only`: after a learner restart in this
        process, `submitted` is still right and only the learner's side rolls back."""
        if not settled_only:
            self.submitted = int(totals.get("submitted", 0))
        self.settled = collections.Counter({ArchiveStatus(k): int(v) for k, v in totals.get("settled", {}).items()})


@dataclass
class BatchGate:
    batch_size: int
    token_budget: int  # 0 = count trajectories only

    def ready(self, n_trajectories: int, n_tokens: int) -> bool:
        if self.token_budget > 0:
            return n_tokens >= self.token_budget
        return n_trajectories >= self.batch_size


class GroupBuffer:
    """Finished trajectories wait here until their whole group has arrived.

    Advantages are normalised within a group, so the learner only ever sees complete groups.
    A finished group is split into what can train and what cannot: failed episodes (an env or
    worker fault, not the policy's doing), too-stale samples, and groups left with fewer than
    two usable members (no baseline) are returned as `dropped` with their ArchiveStatus, never lost.
    """

    def __init__(self, group_size: int, gate: BatchGate, bound: StalenessBound) -> None:
        self.group_size = group_size
        self.gate = gate
        self.bound = bound
        self._arrived: dict[str, int] = {}  # group_id -> members seen (dropped ones included)
        self._groups: dict[str, list] = {}  # group_id -> [(entry_id, Trajectory)] still usable

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def add(self, entry_id: str, traj) -> None:
        self._arrived[traj.group_id] = self._arrived.get(traj.group_id, 0) + 1
        self._groups.setdefault(traj.group_id, []).append((entry_id, traj))

    def pop_batch(self, version: int) -> tuple[list, list]:
        """(batch, dropped): complete groups, oldest first, until the gate is satisfied.

        batch: [(entry_id, traj)]; dropped: [(entry_id, traj, ArchiveStatus)]. While the gate is
        not met the batch is empty and the complete groups stay buffered (re-checked for
        staleness on the next call).
        """
        batch, dropped, taken, n_tok = [], [], [], 0
        for gid in list(self._groups):
            if self._arrived[gid] < self.group_size:
                continue
            usable = []
            for entry_id, traj in self._groups[gid]:
                if traj.status == "failed":
                    dropped.append((entry_id, traj, ArchiveStatus.FAILED))
                elif self.bound.is_stale(traj.min_policy_version, version):
                    dropped.append((entry_id, traj, ArchiveStatus.DROPPED_STALE))
                else:
                    usable.append((entry_id, traj))
            if len(usable) < 2:
                dropped += [(e, t, ArchiveStatus.DROPPED_SMALL_GROUP) for e, t in usable]
                self._forget(gid)
                continue
            self._groups[gid] = usable
            if self.gate.ready(len(batch), n_tok):
                continue  # enough already; keep cleaning the rest
            taken.append(gid)
            batch += usable
            n_tok += sum(t.num_tokens for _, t in usable)
        if not self.gate.ready(len(batch), n_tok):
            return [], dropped
        for gid in taken:
            self._forget(gid)
        return batch, dropped

    def _forget(self, gid: str) -> None:
        del self._groups[gid]
        del self._arrived[gid]
