"""The rollout worker: episodes in, trajectories onto the stream.

    worker = RolloutWorker(policy_cfg, rollout_cfg, stream_spec, run_id="r1")
    result = await worker.run_task(RolloutTask(env_id="kpop/tooluse-v0", seed=3, group_id="g"))

A worker holds one engine (embedded or vLLM) behind a `ChatClient`; every episode gets its own
`ChatSession` (the agent `environments.run_episode` talks to), and many episodes run at once on
one event loop, so their generations share the engine's batches. Each finished episode becomes a
`Trajectory` (exact sampled tokens, rollout logprobs, loss mask = model tokens, one segment per
run of tokens from one policy version) put on the `TrajectoryStream`.

The class is plain Python (tests drive it directly); `actors/rollout_pool.py` runs it as an async
Ray actor. Its `trajectory_id` is the task id, so a task re-issued after a worker died cannot be
trained twice (the stream drops ids it has already acked).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from kpop.config import PolicyConfig, RolloutConfig
from kpop.rollout.chat import ChatClient, ChatSession
from kpop.rollout.engine import Engine, SamplingParams
from kpop.stream import StreamSpec
from kpop.trajectory import Segment, Trajectory

log = logging.getLogger(__name__)


def _task_id() -> str:
    return str(uuid.uuid4())


class RolloutTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env_id: str
    seed: int
    group_id: str
    policy_version: int = Field(0, ge=0)  # the worker waits until it has at least this version
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    task_id: str = Field(default_factory=_task_id)  # becomes the trajectory id
    temperature: float | None = Field(None, ge=0.0)  # None = the worker's rollout.temperature


class TaskResult(BaseModel):
    task_id: str
    trajectory_id: str
    status: str
    reward: float
    num_tokens: int
    num_model_tokens: int
    min_version: int | None
    error: str | None = None
    worker_id: str = ""


def build_engine(kind: str, model: Any, tokenizer: Any, rollout: RolloutConfig, version: int = 0) -> Engine:
    if kind == "embedded":
        from kpop.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(model, tokenizer, max_seqs=rollout.max_concurrent_episodes,
                              max_model_len=rollout.max_episode_tokens + 1, version=version)
    if kind == "vllm":
        from kpop.rollout.vllm_engine import VLLMEngine

        return VLLMEngine.from_model(model, tokenizer, max_model_len=rollout.max_episode_tokens + 1, version=version)
    raise ValueError(f"rollout.engine must be 'embedded' or 'vllm', got {kind!r}")


class RolloutWorker:
    def __init__(
        self,
        policy: PolicyConfig | dict,
        rollout: RolloutConfig | dict,
        stream: StreamSpec | None,
        run_id: str,
        *,
        step_timeout_s: float | None = None,
        seed: int = 0,
        worker_id: str | None = None,
    ) -> None:
        from kpop.policy.checkpoint import load_policy

        self.policy_cfg = PolicyConfig.model_validate(policy)
        self.cfg = RolloutConfig.model_validate(rollout)
        self.run_id, self.step_timeout_s = run_id, step_timeout_s
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        model, self.tokenizer = load_policy(self.policy_cfg, seed=seed)
        self.engine = build_engine(self.cfg.engine, model, self.tokenizer, self.cfg)
        defaults = SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                  max_tokens=self.cfg.max_new_tokens)
        self.client = ChatClient(self.engine, self.tokenizer, defaults=defaults)
        self.stream = stream.open(consumer=f"rollout-{self.worker_id}") if stream is not None else None
        self._slots = asyncio.Semaphore(self.cfg.max_concurrent_episodes)
        self._version_changed: asyncio.Event | None = None
        self.finished = 0

    # -- control --------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "version": self.engine.version, "finished": self.finished}

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> int:
        # the engine waits for its current step; keep the event loop (other episodes) running
        await asyncio.to_thread(self.engine.update_weights, state_dict, version)
        if self._version_changed is not None:
            self._version_changed.set()
        return self.engine.version

    # -- episodes -------------------------------------------------------------------------------
    async def run_task(self, task: RolloutTask | dict) -> TaskResult:
        task = RolloutTask.model_validate(task)
        async with self._slots:
            await self._wait_for_version(task.policy_version)
            traj = await self.run_episode(task)
            if self.stream is not None:
                await asyncio.to_thread(self.stream.put, traj)
        self.finished += 1
        return TaskResult(
            task_id=task.task_id, trajectory_id=traj.trajectory_id, status=traj.status, reward=traj.reward,
            num_tokens=traj.num_tokens, num_model_tokens=traj.num_model_tokens,
            min_version=traj.min_policy_version, error=traj.error, worker_id=self.worker_id,
        )

    async def run_tasks(self, tasks: list[RolloutTask | dict]) -> list[TaskResult]:
        return list(await asyncio.gather(*(self.run_task(t) for t in tasks)))

    async def _wait_for_version(self, version: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.version < version:
            if self._version_changed is None:
                self._version_changed = asyncio.Event()
            self._version_changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.worker_id} has policy version {self.engine.version}; "
                                   f"task needs >= {version} and no weights arrived in {timeout_s:g} s")
            try:
                await asyncio.wait_for(self._version_changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def run_episode(self, task: RolloutTask) -> Trajectory:
        from environments import make, run_episode

        t0 = time.perf_counter()
        sampling = {} if task.temperature is None else {"temperature": task.temperature}
        session = ChatSession(self.client, max_total_tokens=self.cfg.max_episode_tokens, **sampling)
        env = make(task.env_id, **task.env_kwargs)
        try:
            ep = await run_episode(env, session, seed=task.seed, max_turns=self.cfg.max_turns,
                                   step_timeout_s=self.step_timeout_s)
        finally:
            try:
                env.close()
            except Exception as exc:  # a broken close must not lose the episode
                log.warning("env %s close failed: %s", task.env_id, exc)
        tr = session.trace
        timings = {**ep.timings, "worker_s": time.perf_counter() - t0}
        return Trajectory(
            run_id=self.run_id, trajectory_id=task.task_id, task_id=ep.task_id or f"{task.env_id}#{task.seed}",
            env_id=task.env_id, seed=task.seed, group_id=task.group_id, messages=ep.messages,
            token_ids=tr.token_ids, logprobs=tr.logprobs, loss_mask=tr.loss_mask,
            segments=[Segment(*s) for s in tr.segments()], reward=ep.reward, reward_detail=ep.reward_detail,
            status=ep.status, error=ep.error, timings=timings,
        )

    def close(self) -> None:
        self.engine.close()
        if self.stream is not None:
            self.stream.close()
