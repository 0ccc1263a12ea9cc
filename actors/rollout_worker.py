"""The rollout worker as a Ray actor: `kpop.rollout.worker.RolloutWorker` (all the logic) run
as an async actor, so its episodes share one event loop and the engine's batches."""

from __future__ import annotations

from typing import Any

import ray

from kpop.rollout.worker import RolloutTask, RolloutWorker, TaskResult

__all__ = ["RolloutTask", "RolloutWorker", "TaskResult", "remote_worker"]


def remote_worker(max_inflight: int, actor_options: dict[str, Any] | None = None) -> Any:
    """The actor class: room for `max_inflight` tasks plus control calls (update_weights, ping)
    beside them; no CPU reserved by default (the engine's threads are not Ray tasks)."""
    return ray.remote(RolloutWorker).options(max_concurrency=max_inflight + 4,
                                             **({"num_cpus": 0} | (actor_options or {})))
