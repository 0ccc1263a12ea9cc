"""N rollout workers as Ray actors, supervised: a worker that dies is replaced and its in-flight
tasks are re-issued to the pool, not lost.

    pool = RolloutPool(num_workers=2, worker_kwargs=dict(policy=..., rollout=..., stream=spec, run_id="r"))
    results = pool.run(tasks)              # blocking: every task's TaskResult, in task order
    pool.submit(tasks); pool.poll()        # or streaming: results as they finish
    pool.update_weights(handle)            # a published WeightHandle to every worker; replacements get it too
    pool.shutdown()

`worker_kwargs` are `kpop.rollout.worker.RolloutWorker`'s arguments (policy, rollout, stream,
run_id, step_timeout_s, seed, sandbox). A re-issued task keeps its task id, which is also its
trajectory id, so if the dead worker had in fact already written the trajectory the stream
still trains on it once.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.rollout_worker import RolloutTask, TaskResult, remote_worker
from kpop.weight_sync import WeightHandle

log = logging.getLogger(__name__)
_WORKER_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)


class TaskFailed(RuntimeError):
    """A task was re-issued `max_attempts` times and its worker died every time."""


class RolloutPool:
    def __init__(
        self,
        num_workers: int,
        worker_kwargs: dict[str, Any],
        *,
        max_inflight_per_worker: int = 8,
        max_attempts: int = 3,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        if num_workers < 1 or max_inflight_per_worker < 1 or max_attempts < 1:
            raise ValueError("num_workers, max_inflight_per_worker and max_attempts must be >= 1")
        self.worker_kwargs = worker_kwargs
        self.max_inflight = max_inflight_per_worker
        self.max_attempts = max_attempts
        self._actor_cls = remote_worker(max_inflight_per_worker, actor_options)
        self._weights: WeightHandle | None = None  # the latest version, for replacement workers
        self.workers = [self._start(i) for i in range(num_workers)]
        self.restarts = 0
        self.reissued = 0
        self._queue: collections.deque[RolloutTask] = collections.deque()
        self._inflight: dict[Any, tuple[int, RolloutTask]] = {}  # ObjectRef -> (worker index, task)
        self._attempts: collections.Counter[str] = collections.Counter()
        self._done: list[TaskResult] = []

    def _start(self, index: int) -> Any:
        actor = self._actor_cls.remote(**self.worker_kwargs, worker_id=f"w{index}-{time.monotonic_ns() % 10**6}")
        if self._weights is not None:
            actor.receive_weights.remote(self._weights)  # queued before any task on this actor
        return actor

    # -- tasks ----------------------------------------------------------------------------------
    def submit(self, tasks: list[RolloutTask]) -> None:
        self._queue.extend(RolloutTask.model_validate(t) for t in tasks)
        self._dispatch()

    def inflight(self, worker: int | None = None) -> int:
        return sum(1 for w, _ in self._inflight.values() if worker is None or w == worker)

    def pending(self) -> int:
        return len(self._queue) + len(self._inflight)

    def poll(self, timeout_s: float = 1.0) -> list[TaskResult]:
        """Results finished since the last poll (waits up to `timeout_s` for the first one)."""
        if self._inflight:
            ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout_s)
            ready, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0) if ready else ([], None)
            for ref in ready:
                if ref in self._inflight:  # a worker death may already have re-issued it
                    self._collect(ref)
        self._dispatch()
        out, self._done = self._done, []
        return out

    def run(self, tasks: list[RolloutTask], timeout_s: float = 3600.0,
            on_progress: Callable[[int], None] | None = None) -> list[TaskResult]:
        """Every task's result, in task order; `on_progress(done)` after each batch finishes."""
        tasks = [RolloutTask.model_validate(t) for t in tasks]
        self.submit(tasks)
        want = {t.task_id for t in tasks}
        got: dict[str, TaskResult] = {}
        deadline = time.monotonic() + timeout_s
        while want - set(got):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(want - set(got))} of {len(want)} rollout tasks unfinished after {timeout_s:g} s")
            finished = self.poll(timeout_s=1.0)
            got.update((r.task_id, r) for r in finished)
            if finished and on_progress is not None:
                on_progress(len(got))
        return [got[t.task_id] for t in tasks]

    def _dispatch(self) -> None:
        while self._queue:
            loads = [self.inflight(i) for i in range(len(self.workers))]
            i = min(range(len(loads)), key=loads.__getitem__)
            if loads[i] >= self.max_inflight:
                return
            task = self._queue.popleft()
            self._attempts[task.task_id] += 1
            self._inflight[self.workers[i].run_task.remote(task)] = (i, task)

    def _collect(self, ref: Any) -> None:
        worker, task = self._inflight.pop(ref)
        try:
            self._done.append(ray.get(ref))
        except _WORKER_DEATH as exc:
            self._replace(worker, exc, [task])

    def _replace(self, worker: int, exc: BaseException, failed: list[RolloutTask] = ()) -> None:
        """Start a new actor in the dead one's place and re-issue everything it had in flight."""
        log.warning("rollout worker %d died (%s): replacing it", worker, type(exc).__name__)
        self.restarts += 1
        try:
            ray.kill(self.workers[worker], no_restart=True)
        except Exception:  # already gone
            pass
        self.workers[worker] = self._start(worker)
        lost = [ref for ref, (w, _) in self._inflight.items() if w == worker]
        orphans = [self._inflight.pop(ref)[1] for ref in lost]
        for task in [*failed, *orphans]:
            if self._attempts[task.task_id] >= self.max_attempts:
                raise TaskFailed(f"task {task.task_id} ({task.env_id} seed {task.seed}): worker died on all "
                                 f"{self.max_attempts} attempts; last error: {exc}")
            self.reissued += 1
            self._queue.appendleft(task)

    # -- weights --------------------------------------------------------------------------------
    def update_weights(self, handle: WeightHandle, timeout_s: float = 120.0) -> None:
        """Hand a published version to every worker, which pulls it through its transport; wait
        for all. The handle is small (a reference, a manifest): the weights never pass through here."""
        if not isinstance(handle, WeightHandle):
            raise TypeError(f"update_weights takes a published WeightHandle, got a {type(handle).__name__}")
        version = handle.version
        self._weights = handle
        refs = [w.receive_weights.remote(handle) for w in self.workers]
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for i, ref in enumerate(refs):
            if ref in not_ready:
                raise TimeoutError(f"rollout worker {i} did not take weights version {version} within {timeout_s:g} s")
            try:
                ray.get(ref)
            except _WORKER_DEATH as exc:
                self._replace(i, exc)  # the replacement starts with these weights

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:
                pass
        self.workers = []
