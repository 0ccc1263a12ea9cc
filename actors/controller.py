"""The controller: one `kpop train` run, from an empty run directory to `summary.json`.

    cold-start SFT on oracle demonstrations -> eval (held-out seeds) -> RL -> eval -> summary

RL is asynchronous by default: rollout workers keep generating while the learner trains, new
weights reach the workers after every step (in-flight episodes continue under the new version,
each segment tagged with the version that wrote it), and the learner drops samples older than
`schedule.max_staleness`. Sync mode is the same loop with admission limited to one batch per
policy version, so the two are an honest comparison. The schedule's logic is
`kpop.scheduler.Admission` (what may start, and the counters behind it); the learner's is
`learner.service.LearnerService`. Weights go from the learner to the workers by reference: this
process forwards a `WeightHandle` and never holds the tensors.

Fault tolerance: the rollout pool replaces dead workers and re-issues their tasks; a dead learner
actor is restarted from the newest checkpoint (unacknowledged trajectories are re-read from the
stream); the stream retries through Redis restarts; a weight broadcast that hangs past
`schedule.weight_sync_timeout_s` fails the run loudly. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.colocate import ControllerState
from actors.learner_actor import start_learner
from actors.placement import check_gpus, rollout_options, shares_gpu, weight_transport
from actors.rollout_pool import RolloutPool
from kpop.config import RunConfig, dump_config
from kpop.metrics import MetricsWriter, Progress, add_once, rl_info
from kpop.ray_utils import init_ray, shutdown_ray
from kpop.rollout.worker import RolloutTask, truncation_stats
from kpop.scheduler import Admission, StalenessBound, TaskSource
from kpop.stream import open_stream

log = logging.getLogger("kpop.train")
_ACTOR_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)


class WeightSyncTimeout(RuntimeError):
    """A weight broadcast did not finish within schedule.weight_sync_timeout_s."""


class Controller:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir).resolve()
        self.learner = self.pool = self.eval_pool = self.metrics = self.redis = None
        # Ray first: a cluster that refuses us must leave no half-made run directory behind
        self.ray = init_ray(cfg.ray, self.run_dir)
        try:
            check_gpus(cfg, ray.cluster_resources().get("GPU", 0.0))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            self.t0 = time.time()
            self.stream_spec, self.redis = open_stream(cfg.stream, self.run_dir)
            self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard)
            worker_kwargs = dict(policy=cfg.policy, rollout=cfg.rollout, run_id=cfg.name, seed=cfg.seed,
                                 step_timeout_s=cfg.environments.step_timeout_s, sandbox=cfg.sandbox,
                                 weight_sync=weight_transport(cfg), share_gpu=shares_gpu(cfg.rollout.num_gpus))
            per_worker = cfg.rollout.max_concurrent_episodes
            placed = rollout_options(cfg)
            self.pool = RolloutPool(cfg.rollout.num_workers, {**worker_kwargs, "stream": self.stream_spec},
                                    max_inflight_per_worker=per_worker, actor_options=placed)
            greedy = cfg.rollout.model_copy(update={"temperature": 0.0})
            self.eval_pool = RolloutPool(1, {**worker_kwargs, "rollout": greedy, "stream": None},
                                         max_inflight_per_worker=per_worker, actor_options=placed)
        except BaseException:
            self.close()
            raise
        self.state = ControllerState()
        self.admission = Admission(cfg.schedule.batch_size, StalenessBound(cfg.schedule.max_staleness))
        self.version = 0

    # -- learner ---------------------------------------------------------------------------------

    def _start_learner(self, restore: bool | None = None) -> None:
        """`restore`: load the newest checkpoint (default cfg.resume; always after a learner crash)."""
        crashed = self.learner is not None
        self.learner = start_learner(self.cfg, self.stream_spec)
        restore = self.cfg.resume if restore is None else restore
        extra = ray.get(self.learner.restore.remote()) if restore else None
        if extra is not None:
            self.state = ControllerState.from_extra(extra)
            # after a crash this process's submissions still stand; the learner's decisions roll
            # back to the checkpoint and what it had buffered is re-read from the stream
            self.admission.load_totals(extra.get("admission", {}), settled_only=crashed)
            log.info("resumed %s at RL step %d", self.run_dir, self.state.rl_step)
        if crashed:
            self.admission.forget_buffered()

    def _checkpoint(self) -> None:
        extra = {"controller": asdict(self.state), "admission": self.admission.totals()}
        ray.get(self.learner.checkpoint.remote(extra))

    def _broadcast(self) -> None:
        """Learner weights -> every rollout worker, by reference; a hung sync fails loudly."""
        handle = ray.get(self.learner.publish_weights.remote())
        timeout = self.cfg.schedule.weight_sync_timeout_s
        for pool in (self.pool, self.eval_pool):
            try:
                pool.update_weights(handle, timeout_s=timeout)
            except TimeoutError as exc:
                raise WeightSyncTimeout(f"weight sync of version {handle.version} hung: {exc}") from None
        self.version = handle.version

    # -- phases ----------------------------------------------------------------------------------

    def sft(self) -> None:
        cfg = self.cfg
        if self.state.sft_done or cfg.learner.sft_steps == 0:
            return
        from kpop.policy.tokenizer import get_tokenizer, load_tokenizer
        from kpop.sft import collect_demos

        tok = load_tokenizer(cfg.policy.tokenizer) if cfg.policy.tokenizer else get_tokenizer()
        # fresh demonstrations rather than epochs over few: the policy must learn to copy numbers
        # from the prompt, not memorise answers (demos are cheap: ~5 ms each)
        n_demos = min(4096, max(64, cfg.learner.sft_steps * cfg.learner.sft_batch_size))
        demos = collect_demos(cfg.environments.sft or cfg.environments.train, n_demos, tok, seed=cfg.seed,
                              step_timeout_s=cfg.environments.step_timeout_s)
        log.info("cold-start SFT: %d oracle demonstrations, %d steps", len(demos), cfg.learner.sft_steps)
        steps, demos_ref, losses = cfg.learner.sft_steps, ray.put(demos), []
        chunk = max(1, steps // 50)  # ~2% of the phase per call: its rows and progress appear as it runs
        with Progress("sft", steps, bar=cfg.logging.progress) as progress:
            for start in range(0, steps, chunk):
                rows = ray.get(self.learner.sft.remote(demos_ref, start, min(steps, start + chunk),
                                                       cfg.learner.sft_batch_size, cfg.seed))
                for i, row in enumerate(rows, start):
                    self.metrics.log(i, row, phase="sft")
                losses += [r["sft_loss"] for r in rows]
                progress.update(len(losses), f"loss {losses[-1]:.3f}")
        log.info("SFT loss %.3f -> %.3f", losses[0], losses[-1])
        self.state.sft_done = True
        self._checkpoint()

    def evaluate(self, tag: str) -> tuple[float, float | None]:
        """Mean reward on the held-out seeds of the eval environments: greedy, and sampled at the
        rollout temperature (`schedule.eval_samples` episodes per seed; None when 0)."""
        cfg = self.cfg
        specs = cfg.environments.eval or cfg.environments.train
        modes: list[float | None] = [None] + [cfg.rollout.temperature] * cfg.schedule.eval_samples
        tasks = [RolloutTask(env_id=s.id, seed=seed, group_id=f"eval-{tag}", env_kwargs=s.kwargs,
                             policy_version=self.version, temperature=t)
                 for s in specs for seed in cfg.environments.eval_seeds for t in modes]
        with Progress(f"eval {tag}", len(tasks), bar=cfg.logging.progress) as progress:
            results = self.eval_pool.run(tasks, on_progress=lambda done: progress.update(done, "episodes"))
        greedy = [r for r, t in zip(results, tasks) if t.temperature is None]
        sampled = [r for r, t in zip(results, tasks) if t.temperature is not None]
        reward = statistics.fmean(r.reward for r in greedy)
        reward_sampled = statistics.fmean(r.reward for r in sampled) if sampled else None
        per_env = {s.id: statistics.fmean(r.reward for r, t in zip(results, tasks)
                                          if t.env_id == s.id and t.temperature is None) for s in specs}
        # Per held-out task (greedy reward, mean of its samples): the standard error is over tasks, as
        # a task's samples are not independent, and the lists let a before/after difference be paired.
        per_task_sampled: dict[tuple[str, int], list[float]] = {}
        for r, t in zip(results, tasks):
            if t.temperature is not None:
                per_task_sampled.setdefault((t.env_id, t.seed), []).append(r.reward)
        task_greedy = [r.reward for r in greedy]
        task_sampled = [statistics.fmean(v) for v in per_task_sampled.values()]
        row = {"eval_reward": reward, "version": self.version, **{f"eval_reward/{k}": v for k, v in per_env.items()},
               "eval_reward_se": standard_error(task_greedy), "eval_task_rewards": task_greedy}
        if reward_sampled is not None:
            row |= {"eval_reward_sampled": reward_sampled, "eval_reward_sampled_se": standard_error(task_sampled),
                    "eval_task_rewards_sampled": task_sampled}
        self.metrics.log(self.state.rl_step, row, phase="eval")
        log.info("eval %s: mean reward %.3f +- %.3f greedy over %d episodes%s (version %d)", tag, reward,
                 row["eval_reward_se"], len(greedy), "" if reward_sampled is None else
                 f", {reward_sampled:.3f} +- {row['eval_reward_sampled_se']:.3f} sampled over {len(sampled)}",
                 self.version)
        return reward, reward_sampled

    def rl(self) -> None:
        cfg, sched = self.cfg, self.cfg.schedule
        source = TaskSource(cfg.environments.train, cfg.rollout.group_size, cfg.seed, self.state.task_counter)
        step_ref = None
        finished: list = []  # episodes finished since the last learner step
        t_step = time.perf_counter()
        with Progress("rl", sched.rl_steps, bar=cfg.logging.progress) as progress:
            while self.state.rl_step < sched.rl_steps:
                while self.admission.capacity() >= cfg.rollout.group_size:  # keep the pipeline full
                    group = source.next_group()
                    self.pool.submit([RolloutTask(env_id=t.env_id, seed=t.seed, group_id=f"{cfg.name}-{t.group_id}",
                                                  env_kwargs=t.env_kwargs, policy_version=self.version)
                                      for t in group])
                    self.admission.submit(len(group))
                results = self.pool.poll(timeout_s=0.05)
                self.admission.finish(len(results))
                finished += results
                if step_ref is None:
                    step_ref = self.learner.rl_step.remote(timeout_s=2.0)
                ready, _ = ray.wait([step_ref], timeout=0.05)
                if not ready:
                    continue
                step_ref = None
                try:
                    report = ray.get(ready[0])
                    self.admission.settle(report.settled)
                    if report.metrics is None:
                        continue
                    self.state.rl_step += 1
                    self.state.task_counter = source.counter
                    now = time.perf_counter()
                    trained = report.metrics.get("tokens", 0.0)  # absent: the learner skipped the step
                    row = add_once(report.metrics, wall_tokens_per_s=trained / max(now - t_step, 1e-9),
                                   step_wall_s=now - t_step)
                    t_step = now
                    # warn loudly (with the numbers) on the first and last step when most episodes were cut
                    loud = self.state.rl_step in (1, sched.rl_steps)
                    cut = truncation_stats(finished, cfg.rollout.max_episode_tokens, warn_above=0.5 if loud else 1.0)
                    finished = []
                    row = add_once(row, **{f"episodes_{k}": v for k, v in cut.items() if k != "episodes"})
                    self._broadcast()
                    row = add_once(row, worker_restarts=float(self.pool.restarts),
                                   **{f"episodes_{k}": float(v) for k, v in self.admission.counters().items()})
                    self.metrics.log(self.state.rl_step, row, phase="rl")
                    progress.update(self.state.rl_step, rl_info(row))
                    if self.state.rl_step % cfg.learner.checkpoint_every == 0 or self.state.rl_step == sched.rl_steps:
                        self._checkpoint()
                except _ACTOR_DEATH as exc:
                    # the learner can die in its step, its weight export or its checkpoint: in each
                    # case the newest checkpoint (and the controller state saved in it) is the truth
                    log.warning("learner died (%s): restarting it from the newest checkpoint", type(exc).__name__)
                    self._start_learner(restore=True)
                    self._broadcast()
                    continue
                if sched.eval_every and self.state.rl_step % sched.eval_every == 0:
                    self.evaluate(f"step{self.state.rl_step}")

    # -- the whole run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start_learner()
        self.sft()
        self._broadcast()
        if cfg.schedule.eval_before_rl and self.state.eval_before is None:
            self.state.eval_before, self.state.eval_before_sampled = self.evaluate("before_rl")
            self._checkpoint()
        self.rl()
        eval_after = (self.evaluate("after_rl") if cfg.schedule.rl_steps
                      else (self.state.eval_before, self.state.eval_before_sampled))
        # the learner writes it from its own weights: no copy of the model passes through here
        ray.get(self.learner.save_policy.remote(str(self.run_dir / "policy")))
        summary = self._summary(eval_after)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        return summary

    def _summary(self, eval_after: tuple[float | None, float | None]) -> dict[str, Any]:
        return self.state.summary(self.run_dir, self.admission, eval_after, worker_restarts=self.pool.restarts,
                                  mode=self.cfg.schedule.mode, wall_s=time.time() - self.t0)

    def close(self) -> None:
        closers = [c for c in (getattr(self.pool, "shutdown", None), getattr(self.eval_pool, "shutdown", None),
                               getattr(self.metrics, "close", None)) if c is not None]
        for closer in closers:
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                log.warning("shutdown: %s", exc)
        if self.learner is not None:
            try:
                ray.get(self.learner.close.remote(), timeout=30)
            except Exception as exc:
                log.warning("learner close: %s", exc)
        shutdown_ray()  # stops a Ray this run started; only detaches from a cluster it attached to
        if self.redis is not None:
            self.redis.stop()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` to completion (or resume it) and return the summary."""
    controller = Controller(cfg)
    try:
        return controller.run()
    finally:
        controller.close()


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of `values` (0 for fewer than two)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
