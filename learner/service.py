"""The learner service: stream -> complete groups -> DeepSpeed step -> versioned weights out.

    service = LearnerService(cfg, stream_spec, InProcessSync())
    report = service.rl_step(timeout_s=2.0)      # StepReport: step metrics (or None) + dispositions
    service.checkpoint({"controller": ...})     # then the trajectories it used are acknowledged
    handle = service.publish_weights()           # WeightHandle for the rollout engines
    service.save_policy(run_dir / "policy")      # the final HF checkpoint

A plain class (no Ray: `actors/learner_actor.py` runs it as an actor). It owns the consumer side
of the trajectory stream and the acknowledgement discipline that makes a resumed run settle every
trajectory exactly once:

- every entry the learner settles (trained on, or dropped with its ArchiveStatus) is acknowledged
  only *after the checkpoint that contains the decision* is written; until then it stays pending
  in the consumer group, and a restarted learner re-reads it and decides again from that
  checkpoint. The archive rows of those decisions are flushed by the same checkpoint;
- the checkpoint records those entry ids, and `restore` acknowledges them again (idempotent),
  covering a crash between writing the checkpoint and acknowledging.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kpop.config import RunConfig
from kpop.scheduler import BatchGate, GroupBuffer, StalenessBound
from kpop.stream import StreamSpec
from kpop.trajectory import ArchiveStatus
from kpop.weight_sync import WeightHandle, WeightSync

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one `rl_step` call did. `metrics` is None when no full batch arrived in time;
    `settled` counts the trajectories this call settled, by ArchiveStatus value (drops happen
    while waiting too, so they are reported either way)."""

    metrics: dict[str, float] | None
    settled: dict[str, int] = field(default_factory=dict)


class LearnerService:
    def __init__(self, cfg: RunConfig, stream: StreamSpec, weight_sync: WeightSync) -> None:
        import torch

        from kpop.archive import TrajectoryArchive
        from kpop.policy.checkpoint import load_policy
        from learner.learner import Learner

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(1)  # one core per process: oversubscribed BLAS threads are 10x slower here
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
        self.weight_sync = weight_sync
        self._restored = False  # see publish_weights
        self.model, self.tokenizer = load_policy(cfg.policy, seed=cfg.seed)
        tok = self.tokenizer
        self.learner = Learner(
            cfg.learner,
            cfg.algorithm,
            self.model,
            total_steps=cfg.schedule.rl_steps,
            token_texts=lambda ids: [tok.decode([i]) for i in ids],
        )
        self.stream = stream.open(consumer="learner")
        gate = BatchGate(cfg.schedule.batch_size, cfg.schedule.token_budget)
        self.buffer = GroupBuffer(cfg.rollout.group_size, gate, StalenessBound(cfg.schedule.max_staleness))
        # rows are written only by `checkpoint`: a decision a crash undoes leaves no row behind
        self.archive = TrajectoryArchive(self.run_dir, flush_every=2**62)
        self.unacked: list[str] = []  # settled entries waiting for the next checkpoint

    # -- versions and weights ---------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.learner.version

    def publish_weights(self) -> WeightHandle:
        """The current weights through this service's transport, straight from the learner's device
        (a GPU-to-GPU transport never stages them in host memory). The first publish after `restore`
        is a rewind: engines may hold newer weights that died with the previous learner."""
        with self.learner.weights() as state:
            handle = self.weight_sync.publish(state, self.learner.version)
        rewind, self._restored = self._restored, False
        return dataclasses.replace(handle, rewind=True) if rewind else handle

    def save_policy(self, out: str | Path) -> str:
        """The current weights as an HF checkpoint (config.json + safetensors + tokenizer) in
        `out`, written from the learner's own model: nothing else builds a copy of it."""
        from kpop.policy.checkpoint import save_checkpoint

        out = Path(out)
        with self._whole_parameters():
            save_checkpoint(self.learner.engine.module, out)
        self.tokenizer.save_pretrained(out)
        return str(out)

    @contextlib.contextmanager
    def _whole_parameters(self) -> Iterator[None]:
        """ZeRO-3 keeps a shard of each parameter per rank; the writer needs whole tensors."""
        if self.cfg.learner.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.learner.engine.module.parameters()), modifier_rank=None):
            yield

    # -- SFT -----------------------------------------------------------------------------------

    def sft(self, demos: list[tuple[list[int], list[int]]], start: int, stop: int, batch_size: int,
            seed: int) -> list[dict]:
        """SFT steps `start..stop-1`, one metrics row each. The caller runs the phase in chunks
        (so it can report and log as it goes); each step draws its batch from its own seeded
        RNG, so any split into chunks trains on exactly the same batches."""
        if not 0 <= start <= stop:
            raise ValueError(f"sft: steps {start}..{stop} is not a range of step indices")
        return [self.learner.sft_step(random.Random(f"sft-{seed}-{i}").sample(demos, min(batch_size, len(demos))))
                for i in range(start, stop)]

    # -- RL --------------------------------------------------------------------------------------

    def rl_step(self, timeout_s: float) -> StepReport:
        """Wait up to `timeout_s` for a full batch of complete groups and train on it."""
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        settled: collections.Counter[str] = collections.Counter()
        while True:
            batch, dropped = self.buffer.pop_batch(self.version)
            settled.update(self._drop(dropped))
            if batch:
                break
            if time.monotonic() > deadline:
                return StepReport(None, dict(settled))
            for entry_id, traj in self.stream.get(64, block_ms=200):
                self.buffer.add(entry_id, traj)
        waited_s = time.perf_counter() - t0
        trajs = [t for _, t in batch]
        version = self.version  # the weights this batch is trained on (train_step bumps it)
        metrics = self.learner.train_step(trajs)
        self.unacked += [e for e, _ in batch]
        settled[ArchiveStatus.CONSUMED.value] += len(batch)
        self.archive.write(trajs, status=ArchiveStatus.CONSUMED.value, step=self.learner.rl_steps,
                           policy_version=version, **self.learner.last_token_columns())
        # the learner's reward_mean is the shaped reward its advantages used (length reward
        # included); the environments' own reward is reported beside it, not over it
        metrics.update(
            task_reward_mean=statistics.fmean(t.reward for t in trajs),
            staleness_max=float(max(t.staleness(version) for t in trajs)),
            wait_s=waited_s,
        )
        return StepReport(metrics, dict(settled))

    def _drop(self, dropped: list) -> collections.Counter[str]:
        from kpop.algo.losses import dropped_decisions  # torch: imported where the learner runs

        counts: collections.Counter[str] = collections.Counter()
        for disposition in ArchiveStatus:
            group = [t for _, t, d in dropped if d == disposition]
            if group:
                stale = disposition == ArchiveStatus.DROPPED_STALE
                self.archive.write(group, status=disposition.value, step=self.learner.rl_steps,
                                   policy_version=self.version,
                                   decisions=[dropped_decisions(t.loss_mask, stale) for t in group])
                counts[disposition.value] += len(group)
        self.unacked += [e for e, _, _ in dropped]
        return counts

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, extra: dict[str, Any]) -> str:
        """Save, then acknowledge what the saved state already decided."""
        self.archive.flush()
        path = self.learner.save(self.run_dir / "checkpoints", extra={**extra, "unacked": self.unacked})
        self.stream.ack(self.unacked)
        self.unacked = []
        return str(path)

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint if there is one; returns the caller's saved `extra`."""
        ckpt = self.run_dir / "checkpoints"
        if not (ckpt / "latest").is_file():
            return None
        extra = self.learner.load(ckpt)
        self._settle(set(extra.pop("unacked", [])))
        self._restored = True
        return extra

    def _settle(self, decided: set[str]) -> None:
        """Ack the entries the restored checkpoint already decided.

        Normally `checkpoint` acked them right after saving and they are gone from the stream.
        After a crash between save and ack they are still pending for this consumer name, and
        this fresh stream handle never delivered them, so they cannot be acked by id: read them
        back (own pending entries come first), ack those, and buffer everything else for training.
        """
        while decided:
            got = self.stream.get(256, block_ms=0)
            if not got:
                return
            for entry_id, traj in got:
                if entry_id in decided:
                    decided.discard(entry_id)
                    self.stream.ack([entry_id])
                else:
                    self.buffer.add(entry_id, traj)

    def close(self) -> None:
        self.archive.close()
        self.stream.close()
