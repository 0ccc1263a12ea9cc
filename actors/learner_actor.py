"""The learner as a Ray actor: `learner.service.LearnerService`, publishing weights through the
transport `actors.placement.weight_transport` picks (CUDA IPC between GPUs of one node, else Ray's
object store). Callers get a small `WeightHandle` (IPC handles or an ObjectRef, and a manifest),
so the driver forwards a reference and never holds the tensors."""

from __future__ import annotations

from typing import Any

import ray

from kpop.config import RunConfig
from kpop.stream import StreamSpec
from actors.placement import learner_options, shares_gpu, weight_transport
from kpop.weight_sync import make_sync
from learner.service import LearnerService


class _LearnerActor(LearnerService):
    def __init__(self, cfg: RunConfig, stream: StreamSpec) -> None:
        if shares_gpu(cfg.learner.num_gpus):
            import torch

            # the rollout engines on this GPU hold rollout.gpu_memory_fraction of it
            torch.cuda.set_per_process_memory_fraction(1.0 - cfg.rollout.gpu_memory_fraction)
        super().__init__(cfg, stream, make_sync(weight_transport(cfg), bucket_bytes=cfg.learner.sync_bucket_mb << 20))


def start_learner(cfg: RunConfig, stream: StreamSpec) -> Any:
    """A new learner actor, placed as `actors.placement.learner_options` says."""
    return ray.remote(_LearnerActor).options(**learner_options(cfg)).remote(cfg, stream)
