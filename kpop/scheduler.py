"""The controller's schedule, as plain logic (no Ray, no I/O) so it can be tested directly.

- `TaskSource`: a seeded, resumable stream of tasks; each task is sampled `group_size` times
  (one GRPO/RLOO group), environments drawn by their configured weights.
- `Admission`: how many episodes may be in flight. Admission is capped at
  `(max_staleness + 1) x batch_size` so nothing admitted now can be older than the bound when
  it is consumed, unless the environment is slow; sync RL is the same rule with staleness 0.
- `BatchGate`: decides when the learner steps (a batch of trajectories, or a token budget)
  and which samples are too stale to train on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kpop.config import EnvSpec


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


@dataclass
class Admission:
    """Episodes that may be started now: at most `(max_staleness + 1) x batch_size` admitted and
    not yet consumed. Sync mode is max_staleness 0: one batch in flight, nothing admitted under
    an old version survives the staleness check, so every trained sample is fresh."""

    batch_size: int
    max_staleness: int

    def capacity(self, in_flight: int, buffered: int) -> int:
        """`in_flight`: running episodes; `buffered`: finished, not yet consumed or dropped."""
        return max(0, (self.max_staleness + 1) * self.batch_size - in_flight - buffered)


@dataclass
class BatchGate:
    batch_size: int
    token_budget: int  # 0 = count trajectories only
    max_staleness: int

    def is_stale(self, min_version: int, current_version: int) -> bool:
        return current_version - min_version > self.max_staleness

    def ready(self, n_trajectories: int, n_tokens: int) -> bool:
        if self.token_budget > 0:
            return n_tokens >= self.token_budget
        return n_trajectories >= self.batch_size


class GroupBuffer:
    """Finished trajectories wait here until their whole group has arrived.

    Advantages are normalised within a group, so the learner only ever sees complete groups.
    A finished group is split into what can train and what cannot: failed episodes (an env or
    worker fault, not the policy's doing), too-stale samples, and groups left with fewer than
    two usable members (no baseline) are returned as `dropped` with a reason, never lost.
    """

    def __init__(self, group_size: int, gate: BatchGate) -> None:
        self.group_size = group_size
        self.gate = gate
        self._arrived: dict[str, int] = {}  # group_id -> members seen (dropped ones included)
        self._groups: dict[str, list] = {}  # group_id -> [(entry_id, Trajectory)] still usable

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def add(self, entry_id: str, traj) -> None:
        self._arrived[traj.group_id] = self._arrived.get(traj.group_id, 0) + 1
        self._groups.setdefault(traj.group_id, []).append((entry_id, traj))

    def pop_batch(self, version: int) -> tuple[list, list]:
        """(batch, dropped): complete groups, oldest first, until the gate is satisfied.

        batch: [(entry_id, traj)]; dropped: [(entry_id, traj, reason)] with reason
        "failed" | "stale" | "small_group". While the gate is not met the batch is empty and
        the complete groups stay buffered (re-checked for staleness on the next call).
        """
        batch, dropped, taken, n_tok = [], [], [], 0
        for gid in list(self._groups):
            if self._arrived[gid] < self.group_size:
                continue
            usable = []
            for entry_id, traj in self._groups[gid]:
                if traj.status == "failed":
                    dropped.append((entry_id, traj, "failed"))
                elif traj.min_policy_version is not None and self.gate.is_stale(traj.min_policy_version, version):
                    dropped.append((entry_id, traj, "stale"))
                else:
                    usable.append((entry_id, traj))
            if len(usable) < 2:
                dropped += [(e, t, "small_group") for e, t in usable]
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
