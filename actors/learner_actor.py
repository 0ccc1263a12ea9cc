"""The learner service: stream -> complete groups -> DeepSpeed step -> versioned weights.

A plain class; `actors.controller` runs it as a Ray actor. It owns the consumer side of the
trajectory stream and the acknowledgement discipline that makes a resumed run train on no
trajectory twice and lose none:

- entries used by a step are acknowledged only *after the checkpoint that contains the step*
  is written (until then they stay pending in the consumer group, and a restarted learner
  re-reads them and trains them again on top of that checkpoint);
- the checkpoint records those entry ids, and `restore` acknowledges them again (idempotent),
  covering a crash between writing the checkpoint and acknowledging;
- dropped entries (stale, failed, groups too small) are archived and acknowledged at once.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from kpop.config import RunConfig
from kpop.scheduler import BatchGate, GroupBuffer
from kpop.stream import StreamSpec

log = logging.getLogger(__name__)


class LearnerService:
    def __init__(self, cfg: RunConfig, stream: StreamSpec) -> None:
        import torch

        from kpop.archive import TrajectoryArchive
        from kpop.policy.checkpoint import load_policy
        from learner.learner import Learner

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(1)  # one core per actor: oversubscribed BLAS threads are 10x slower here
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
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
        gate = BatchGate(cfg.schedule.batch_size, cfg.schedule.token_budget, cfg.schedule.max_staleness)
        self.buffer = GroupBuffer(cfg.rollout.group_size, gate)
        self.archive = TrajectoryArchive(self.run_dir)
        self.unacked: list[str] = []  # used by a step, waiting for the next checkpoint
        self.counts = {"consumed": 0, "dropped_stale": 0, "dropped_failed": 0, "dropped_small_group": 0}

    # -- versions and weights ---------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.learner.version

    def status(self) -> tuple[int, dict[str, int]]:
        return self.learner.version, dict(self.counts)

    def weights(self) -> tuple[dict, int]:
        return self.learner.export_weights()

    # -- SFT -----------------------------------------------------------------------------------

    def sft(self, demos: list[tuple[list[int], list[int]]], steps: int, batch_size: int, seed: int) -> list[dict]:
        import random

        rng = random.Random(seed)
        rows = []
        for _ in range(steps):
            batch = rng.sample(demos, min(batch_size, len(demos)))
            rows.append(self.learner.sft_step(batch))
        return rows

    # -- RL --------------------------------------------------------------------------------------

    def rl_step(self, timeout_s: float) -> dict[str, Any] | None:
        """Wait for a full batch of complete groups, train on it; None if none came in time."""
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        while True:
            batch, dropped = self.buffer.pop_batch(self.version)
            self._drop(dropped)
            if batch:
                break
            if time.monotonic() > deadline:
                return None
            for entry_id, traj in self.stream.get(64, block_ms=200):
                self.buffer.add(entry_id, traj)
        waited_s = time.perf_counter() - t0
        trajs = [t for _, t in batch]
        version = self.version  # the weights this batch is trained on (train_step bumps it)
        staleness = [t.staleness(version) for t in trajs]
        metrics = self.learner.train_step(trajs)
        self.unacked += [e for e, _ in batch]
        self.counts["consumed"] += len(batch)
        self.archive.write(trajs, status="consumed", step=self.learner.rl_steps, policy_version=version)
        rewards = [t.reward for t in trajs]
        metrics.update(
            reward_mean=statistics.fmean(rewards),
            staleness_mean=statistics.fmean(staleness),
            staleness_max=float(max(staleness)),
            tokens=float(sum(t.num_tokens for t in trajs)),
            wait_s=waited_s,
            batch_trajectories=float(len(trajs)),
            **{k: float(v) for k, v in self.counts.items()},
        )
        return metrics

    def _drop(self, dropped: list) -> None:
        if not dropped:
            return
        for reason in ("stale", "failed", "small_group"):
            group = [t for _, t, r in dropped if r == reason]
            if group:
                status = "failed" if reason == "failed" else "dropped_stale" if reason == "stale" else "dropped_small_group"
                self.archive.write(group, status=status, step=self.learner.rl_steps, policy_version=self.version)
                self.counts[f"dropped_{reason}"] += len(group)
        self.stream.ack([e for e, _, _ in dropped])

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, extra: dict[str, Any]) -> str:
        """Save, then acknowledge what the saved weights already contain."""
        self.archive.flush()
        path = self.learner.save(self.run_dir / "checkpoints", extra={**extra, "unacked": self.unacked,
                                                                       "counts": self.counts})
        self.stream.ack(self.unacked)
        self.unacked = []
        return str(path)

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint if there is one; returns the controller's saved state."""
        ckpt = self.run_dir / "checkpoints"
        if not (ckpt / "latest").is_file():
            return None
        extra = self.learner.load(ckpt)
        self._settle(set(extra.pop("unacked", [])))
        self.counts.update(extra.pop("counts", {}))
        return extra

    def _settle(self, trained: set[str]) -> None:
        """Ack the entries the restored checkpoint already trained on.

        Normally `checkpoint` acked them right after saving and they are gone from the stream.
        After a crash between save and ack they are still pending for this consumer name, and
        this fresh stream handle never delivered them, so they cannot be acked by id: read them
        back (own pending entries come first), ack those, and buffer everything else for training.
        """
        while trained:
            got = self.stream.get(256, block_ms=0)
            if not got:
                return
            for entry_id, traj in got:
                if entry_id in trained:
                    trained.discard(entry_id)
                    self.stream.ack([entry_id])
                else:
                    self.buffer.add(entry_id, traj)

    def close(self) -> None:
        self.archive.close()
        self.stream.close()
