"""Where a Ray run's actors go and how weights travel between them, resolved from the config.

    learner_options(cfg)   -> {"num_cpus": 0, "num_gpus": 0.5, ...}    # ray.remote(...).options(**these)
    rollout_options(cfg)   -> {"num_cpus": 0, "num_gpus": 0.5}
    weight_transport(cfg)  -> "ipc" | "object_store"

The colocated layout on one GPU is fractional GPUs: `learner.num_gpus: 0.5` and
`rollout.num_gpus: 0.5` put both actors on the same device (Ray packs fractions onto one GPU
before opening another); each engine keeps to `rollout.gpu_memory_fraction` of the GPU's memory
and the learner to the rest. The eval worker takes a rollout worker's share as well: with an eval
phase on one GPU, choose shares that sum to at most 1 (e.g. learner 0.5, rollout 0.25).
"""

from __future__ import annotations

from typing import Any

from kpop.config import RunConfig


def learner_options(cfg: RunConfig) -> dict[str, Any]:
    # no Ray restarts: the controller restarts the learner from its checkpoint, the only state it
    # can resume correctly from; no CPU reserved, so a small machine still fits every actor
    return {"num_cpus": 0, "num_gpus": cfg.learner.num_gpus, "max_restarts": 0}


def rollout_options(cfg: RunConfig) -> dict[str, Any]:
    return {"num_cpus": 0, "num_gpus": cfg.rollout.num_gpus}


def shares_gpu(num_gpus: float) -> bool:
    """A share of one GPU (0 < n < 1): the actor keeps to its part of the device's memory."""
    return 0 < num_gpus < 1


def weight_transport(cfg: RunConfig) -> str:
    """`learner.weight_sync`, with auto resolved: CUDA IPC when the learner and the engines are all
    on GPUs (a node's processes map the learner's buckets: no host copy), else the object store."""
    if cfg.learner.weight_sync != "auto":
        return cfg.learner.weight_sync
    return "ipc" if cfg.learner.num_gpus > 0 and cfg.rollout.num_gpus > 0 else "object_store"


def check_gpus(cfg: RunConfig, cluster_gpus: float) -> None:
    """Refuse at once a run whose GPU shares the cluster cannot hold (Ray would wait for them
    forever): the learner, every rollout worker and the eval worker."""
    want = cfg.learner.num_gpus + (cfg.rollout.num_workers + 1) * cfg.rollout.num_gpus
    if want > cluster_gpus + 1e-9:
        raise ValueError(f"the run asks for {want:g} GPUs (learner.num_gpus {cfg.learner.num_gpus:g} + "
                         f"{cfg.rollout.num_workers} rollout workers and 1 eval worker x rollout.num_gpus "
                         f"{cfg.rollout.num_gpus:g}) but the Ray cluster has {cluster_gpus:g}")
