"""The rollout side of the loop in plain Python: tasks in, trajectories onto the stream.

    worker = RolloutWorker(policy_cfg, rollout_cfg, stream_spec, run_id="r1", sandbox=sandbox_cfg)
    result = await worker.run_task(RolloutTask(env_id="kpop/tooluse-v0", seed=3, group_id="g"))

    engine = build_engine(rollout_cfg, model, tokenizer)                 # embedded | vllm
    traj = await play_episode(ChatClient(engine, tokenizer), env, task)  # one episode -> Trajectory

`play_episode` is the one episode loop: rollout, `kpop eval`, SFT demonstrations (the env's
oracle as `teacher`, tokenised by the same prompt building) and the test fixtures all call it.

A worker holds one engine behind a `ChatClient` and plays many episodes at once on one event
loop, so their generations share the engine's batches. It keeps one sandbox pool for its whole
life and hands it to every env whose constructor takes a `sandbox_pool`, so an episode does not
pay a sandbox start. Every env call (construction, reset, step, close) runs in a thread and is
bounded by `step_timeout_s`: a hung env fails its own episode and is abandoned, and the event
loop (every other episode) never waits for it. `actors/` runs this class as a Ray actor; a
trajectory's id is its task id, so a task re-issued after a worker died is trained only once
(the stream drops ids it has already acked).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from environments.core import Agent, ChatEnv
from environments.runner import DEFAULT_TIMEOUT_S, run_episode
from environments.tools import in_thread
from kpop.config import PolicyConfig, RolloutConfig, SandboxConfig
from kpop.policy.cache import lightning_state_dtype
from kpop.rollout.chat import ChatClient, ChatSession
from kpop.rollout.engine import Engine, SamplingParams
from kpop.stream import StreamSpec
from kpop.trajectory import SandboxIdentity, Segment, Trajectory
from kpop.weight_sync import WeightHandle, WeightSync, make_sync

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
    sample_seed: int | None = None  # sampling seed of the episode's first turn; None = unseeded


class TaskResult(BaseModel):
    task_id: str
    trajectory_id: str
    status: str
    reward: float
    num_tokens: int
    num_model_tokens: int
    min_version: int | None
    error: str | None = None
    truncated_by: str | None = None  # "max_episode_tokens" | "max_turns" when the runner cut it
    worker_id: str = ""


def rollout_device(rollout: RolloutConfig) -> str:
    """Where a rollout worker's engine runs: `rollout.num_gpus` > 0 puts it on the (one visible) GPU."""
    if rollout.num_gpus > 0:
        if not torch.cuda.is_available():
            raise ValueError(f"rollout.num_gpus={rollout.num_gpus} but CUDA is not available in this process")
        return "cuda"
    return "cpu"


def cache_blocks(model: Any, rollout: RolloutConfig, budget_bytes: int, block_size: int) -> int:
    """Cache pages for the embedded engine within `budget_bytes` of device memory (its weights
    included), at most what `max_concurrent_episodes` full-length episodes need. Raises naming the
    numbers when not even one longest episode fits."""
    shape = model.cache_shape()
    dtype_bytes = next(model.parameters()).element_size()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes = lightning_state_dtype(rollout.lightning_state_dtype).itemsize
    states = (rollout.max_concurrent_episodes * shape.num_linear_layers * shape.linear_heads
              * shape.linear_head_dim ** 2 * state_bytes)  # Lightning states
    per_block = max(1, shape.num_mla_layers * block_size * shape.latent_dim * dtype_bytes)
    per_episode = -(-(rollout.max_episode_tokens + 1) // block_size)
    fit = (budget_bytes - weights - states) // per_block
    if fit < per_episode:
        raise ValueError(f"rollout.gpu_memory_fraction leaves the engine {budget_bytes / 2**30:.2f} GiB: weights "
                         f"{weights / 2**30:.2f} GiB + recurrent states {states / 2**30:.2f} GiB leave room for "
                         f"{max(fit, 0)} cache pages, and one {rollout.max_episode_tokens}-token episode needs "
                         f"{per_episode}")
    return int(min(fit, rollout.max_concurrent_episodes * per_episode))


def build_engine(rollout: RolloutConfig, model: Any, tokenizer: Any, *, version: int = 0,
                 memory_bytes: int | None = None) -> Engine:
    """The engine `rollout.engine` names, serving `model` with room for
    `rollout.max_concurrent_episodes` episodes of up to `rollout.max_episode_tokens` tokens.
    `memory_bytes`: the engine's share of a GPU it shares with the learner (sizes the cache)."""
    max_model_len = rollout.max_episode_tokens + 1
    if rollout.engine == "embedded":
        from kpop.rollout.embedded import EmbeddedEngine

        kwargs: dict[str, Any] = {}
        if memory_bytes is not None:
            kwargs["block_size"] = 64 if next(model.parameters()).is_cuda else 16  # the engine's own default
            kwargs["num_blocks"] = cache_blocks(model, rollout, memory_bytes, kwargs["block_size"])
        return EmbeddedEngine(model, tokenizer, max_seqs=rollout.max_concurrent_episodes,
                              max_model_len=max_model_len, version=version,
                              lightning_state_dtype=rollout.lightning_state_dtype, **kwargs)
    if rollout.engine == "vllm":
        from kpop.rollout.vllm_engine import VLLMEngine

        return VLLMEngine.from_model(model, tokenizer, max_model_len=max_model_len,
                                     max_seqs=rollout.max_concurrent_episodes, version=version)
    raise ValueError(f"rollout.engine must be 'embedded' or 'vllm', got {rollout.engine!r}")


async def play_episode(client: ChatClient, env: ChatEnv, task: RolloutTask, *, run_id: str = "",
                       max_turns: int | None = None, max_episode_tokens: int | None = None,
                       step_timeout_s: float | None = None, teacher: Agent | None = None) -> Trajectory:
    """Play `task` in `env` (made from `task.env_id` / `task.env_kwargs` by the caller, who closes
    it) with the policy behind `client`, or with `teacher` writing the turns. Never raises for
    what the env or the model does: see `Trajectory.status` / `.error`.

    The trajectory holds the exact sampled tokens, their rollout logprobs, the loss mask (model
    tokens), one segment per run of tokens from one policy version, and the sandbox the task
    declared. An episode cut at `max_episode_tokens` or `max_turns` is "truncated" with reward 0
    (see `environments.runner`)."""
    t0 = time.perf_counter()
    sampling = {k: v for k, v in (("temperature", task.temperature), ("seed", task.sample_seed)) if v is not None}
    session = ChatSession(client, max_total_tokens=max_episode_tokens, teacher=teacher, **sampling)
    ep = await run_episode(env, session, seed=task.seed, max_turns=max_turns, step_timeout_s=step_timeout_s)
    tr = session.trace
    return Trajectory(
        run_id=run_id, trajectory_id=task.task_id, task_id=ep.task_id or f"{task.env_id}#{task.seed}",
        env_id=task.env_id, seed=task.seed, group_id=task.group_id, messages=ep.messages,
        token_ids=tr.token_ids, logprobs=tr.logprobs, loss_mask=tr.loss_mask,
        segments=[Segment(*s) for s in tr.segments()], reward=ep.reward, reward_detail=ep.reward_detail,
        status=ep.status, error=ep.error, timings={**ep.timings, "episode_s": time.perf_counter() - t0},
        sandbox=_sandbox_identity(ep.resources), env_kwargs=task.env_kwargs, routes=tr.episode_routes(),
    )


def _sandbox_identity(resources: Mapping[str, Any]) -> SandboxIdentity | None:
    backend = resources.get("sandbox_backend")
    return SandboxIdentity(backend=backend, image=resources.get("sandbox_image") or "") if backend else None


def truncation_stats(results: Iterable[TaskResult | Trajectory], max_episode_tokens: int | None = None, *,
                     warn_above: float = 0.5) -> dict[str, float]:
    """How many of `results` the runner cut (token budget or turn cap), as metrics; logs a WARNING
    with the numbers when more than `warn_above` of them were cut: such a run mostly trains on
    zero-reward episodes the verifier never saw."""
    rows = [(r.truncated_by if isinstance(r, TaskResult) else r.reward_detail.get("truncated_by")
             if r.status == "truncated" else None, r.num_tokens, r.num_model_tokens) for r in results]
    n = len(rows)
    by_tokens = [(t, m) for cause, t, m in rows if cause == "max_episode_tokens"]
    by_turns = sum(cause == "max_turns" for cause, _, _ in rows)
    stats = {"episodes": float(n), "cut_max_episode_tokens": float(len(by_tokens)), "cut_max_turns": float(by_turns),
             "cut_rate": (len(by_tokens) + by_turns) / n if n else 0.0}
    if n and stats["cut_rate"] > warn_above:
        detail = ""
        if by_tokens:
            total = sum(t for t, _ in by_tokens) / len(by_tokens)
            model = sum(m for _, m in by_tokens) / len(by_tokens)
            detail = (f"; the token-cut ones average {total:.0f} tokens, {total - model:.0f} of them not written by "
                      "the model (prompt, tool schemas, tool results): raise rollout.max_episode_tokens or shorten "
                      "the prompt (e.g. the env kwarg show_tools: false)")
        log.warning("%d of %d episodes (%.0f%%) were cut before the env ended them and score 0 ungraded: %d at "
                    "rollout.max_episode_tokens=%s, %d at rollout.max_turns%s", len(by_tokens) + by_turns, n,
                    100 * stats["cut_rate"], len(by_tokens), max_episode_tokens, by_turns, detail)
    return stats


@functools.lru_cache(maxsize=None)
def _takes_sandbox_pool(env_id: str) -> bool:
    """Whether the env's constructor has a `sandbox_pool` parameter (read from its registration)."""
    from environments.registry import constructor_params

    try:
        return "sandbox_pool" in constructor_params(env_id)[0]
    except KeyError:
        return False  # `make` names the problem


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
        sandbox: SandboxConfig | dict | None = None,  # None: envs start their own sandboxes
        weight_sync: WeightSync | str = "inprocess",  # the transport, or its name (kpop.weight_sync.make_sync)
        share_gpu: bool = False,  # the GPU is shared with the learner: keep to rollout.gpu_memory_fraction
    ) -> None:
        from kpop.policy.checkpoint import load_policy

        self.policy_cfg = PolicyConfig.model_validate(policy)
        self.cfg = RolloutConfig.model_validate(rollout)
        self.sandbox_cfg = None if sandbox is None else SandboxConfig.model_validate(sandbox)
        self.run_id, self.step_timeout_s = run_id, step_timeout_s
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        device = rollout_device(self.cfg)
        budget = None
        if share_gpu and device == "cuda":
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            budget = int(self.cfg.gpu_memory_fraction * total)
        model, self.tokenizer = load_policy(self.policy_cfg, device=device, seed=seed)
        self.engine = build_engine(self.cfg, model, self.tokenizer, memory_bytes=budget)
        self.engine.weight_sync = make_sync(weight_sync) if isinstance(weight_sync, str) else weight_sync
        defaults = SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                                  max_tokens=self.cfg.max_new_tokens)
        self.client = ChatClient(self.engine, self.tokenizer, defaults=defaults)
        self.stream = stream.open(consumer=f"rollout-{self.worker_id}") if stream is not None else None
        self._pool: Any = None  # sandboxes.SandboxPool, started by the first env that takes one
        self._pool_lock = threading.Lock()
        self._slots = asyncio.Semaphore(self.cfg.max_concurrent_episodes)
        self._version_changed: asyncio.Event | None = None
        self.finished = 0

    # -- control --------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "version": self.engine.version, "finished": self.finished}

    async def receive_weights(self, handle: WeightHandle) -> int:
        """Pull a published version through the engine's transport (verified before it loads)."""
        # the engine waits for its current step; keep the event loop (other episodes) running
        await asyncio.to_thread(self.engine.receive_weights, handle)
        return self._new_version()

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> int:
        """Load a state dict given directly (no transport)."""
        await asyncio.to_thread(self.engine.update_weights, state_dict, version)
        return self._new_version()

    def _new_version(self) -> int:
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
            truncated_by=traj.reward_detail.get("truncated_by") if traj.status == "truncated" else None,
        )

    async def run_tasks(self, tasks: list[RolloutTask | dict]) -> list[TaskResult]:
        return list(await asyncio.gather(*(self.run_task(t) for t in tasks)))

    async def play(self, tasks: list[RolloutTask]) -> list[Trajectory]:
        """The tasks' trajectories, at most `max_concurrent_episodes` at a time, not streamed."""

        async def one(task: RolloutTask) -> Trajectory:
            async with self._slots:
                return await self.run_episode(task)

        return list(await asyncio.gather(*(one(t) for t in tasks)))

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
        t0 = time.perf_counter()
        try:
            env = await self._env_call(task.env_id, "construction", self._make_env, task)
        except Exception as exc:  # bad kwargs, a broken plugin, no sandbox backend: this episode fails
            return Trajectory(run_id=self.run_id, trajectory_id=task.task_id, task_id=f"{task.env_id}#{task.seed}",
                              env_id=task.env_id, seed=task.seed, group_id=task.group_id, status="failed",
                              error=str(exc), env_kwargs=task.env_kwargs)
        try:
            traj = await play_episode(self.client, env, task, run_id=self.run_id, max_turns=self.cfg.max_turns,
                                      max_episode_tokens=self.cfg.max_episode_tokens,
                                      step_timeout_s=self.step_timeout_s)
        finally:
            try:
                await self._env_call(task.env_id, "close", env.close)
            except Exception as exc:  # a broken or hung close must not lose the episode
                log.warning("%s", exc)
        traj.timings["worker_s"] = time.perf_counter() - t0
        return traj

    async def _env_call(self, env_id: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a thread of its own, bounded by the step timeout; a hung call is abandoned."""
        timeout = self.step_timeout_s or DEFAULT_TIMEOUT_S
        try:
            return await asyncio.wait_for(in_thread(fn, *args), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"env {env_id} {what} did not return within {timeout:g} s; abandoned") from None
        except Exception as exc:
            raise RuntimeError(f"env {env_id} {what} raised {type(exc).__name__}: {exc}") from None

    def _make_env(self, task: RolloutTask) -> ChatEnv:
        from environments import make

        kwargs = dict(task.env_kwargs)
        if self.sandbox_cfg is not None and "sandbox_pool" not in kwargs and _takes_sandbox_pool(task.env_id):
            kwargs["sandbox_pool"] = self.sandbox_pool()
        return make(task.env_id, **kwargs)

    def sandbox_pool(self) -> Any:
        """The worker's sandbox pool (the `sandbox:` config section), started on first use."""
        with self._pool_lock:
            if self._pool is None:
                from sandboxes import SandboxPool

                c = self.sandbox_cfg or SandboxConfig()
                self._pool = SandboxPool(c.backend, c.image, c.limits, size=c.pool_size)
            return self._pool

    def close(self) -> None:
        self.engine.close()
        if self._pool is not None:
            self._pool.close()
        if self.stream is not None:
            self.stream.close()
