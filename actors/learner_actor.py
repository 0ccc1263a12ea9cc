"""The learner as a Ray actor: `learner.service.LearnerService`, publishing weights through Ray's
object store. The weights are put there once, by this actor; callers get a `WeightHandle` whose
`payload` is the ObjectRef, so the driver forwards a reference and never holds the tensors."""

from __future__ import annotations

from typing import Any

import ray

from kpop.config import RunConfig
from kpop.stream import StreamSpec
from kpop.weight_sync import ObjectStoreSync
from learner.service import LearnerService


class _LearnerActor(LearnerService):
    def __init__(self, cfg: RunConfig, stream: StreamSpec) -> None:
        super().__init__(cfg, stream, ObjectStoreSync())


def start_learner(cfg: RunConfig, stream: StreamSpec) -> Any:
    """A new learner actor. No Ray restarts: the controller restarts it from its checkpoint,
    which is the only state it can resume correctly from."""
    return ray.remote(_LearnerActor).options(num_cpus=0, max_restarts=0).remote(cfg, stream)
