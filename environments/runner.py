"""Run one episode of a chat env with an async agent, surviving whatever the env or agent does.

The rollout worker wraps `agent` to record token ids and logprobs; this loop knows nothing of
models. Every outcome comes back as an `Episode`: an env that raises, hangs or returns garbage
gives status "failed" with the reason, so the worker survives and nothing is silently dropped.
A hung env call is abandoned (its thread cannot be killed): discard that env afterwards.

Truncation: an episode cut before the env ended it, by the runner's `max_turns` or by an agent
that ran out of budget (it raises `EpisodeTruncated`, e.g. a model whose context is full), has
status "truncated" and reward 0 with `reward_detail["truncated_by"]` naming the cause. The
verifier never sees a cut turn: grading half-written text as a final answer rewards answers the
policy never finished. (An env's own turn limit is different: the env ends the episode, its
verifier grades the final state, and the status is "truncated" with the env's reward.)
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from environments.core import Agent, ChatEnv, MessageError, validate_message, validate_messages

Status = Literal["ok", "failed", "truncated"]


@dataclass
class Episode:
    env_id: str | None
    seed: int | None
    task_id: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    reward_detail: dict[str, Any] = field(default_factory=dict)
    status: Status = "ok"
    error: str | None = None
    turns: int = 0
    resources: dict[str, Any] = field(default_factory=dict)  # the task's declaration (reset info)
    timings: dict[str, float] = field(default_factory=lambda: {"env_s": 0.0, "agent_s": 0.0, "wall_s": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpisodeTruncated(Exception):
    """Raised by an agent that cannot write its next turn within its budget. The runner ends the
    episode as "truncated", reward 0, and does not call the env or its verifier again."""

    cause = "agent"  # becomes reward_detail["truncated_by"]


class _Failed(Exception):
    pass


DEFAULT_TIMEOUT_S = 60.0


async def run_episode(env: ChatEnv, agent: Agent, *, seed: int | None = None, max_turns: int | None = None,
                      step_timeout_s: float | None = None, agent_timeout_s: float | None = None,
                      options: dict[str, Any] | None = None) -> Episode:
    """Play one episode. Never raises (except cancellation); see `Episode.status` / `.error`.

    `step_timeout_s` bounds each env call; None takes the task's own declaration
    (`info["resources"]["step_timeout_s"]`; 60 s for reset and for envs that declare none).
    `max_turns` caps assistant turns on top of the env's own limit; hitting it gives status
    "truncated" with reward 0 (the env never reached its verifier), as does an agent raising
    `EpisodeTruncated`.
    """
    if step_timeout_s is not None and step_timeout_s <= 0:
        raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    spec = getattr(env, "spec", None)
    ep = Episode(env_id=spec.id if spec is not None else type(env).__name__, seed=seed)
    t0 = time.perf_counter()

    timeout = step_timeout_s or DEFAULT_TIMEOUT_S

    async def env_call(what: str, coro: Any) -> Any:
        start = time.perf_counter()
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise _Failed(f"env {what} timed out after {timeout:g} s") from None
        except Exception as exc:  # the env's own bug: record it, keep the worker alive
            raise _Failed(f"env {what} raised {type(exc).__name__}: {exc}") from None
        finally:
            ep.timings["env_s"] += time.perf_counter() - start

    try:
        out = await env_call("reset", env.areset(seed=seed, options=options))
        obs, info = _check_reset(out)
        ep.task_id, ep.tools = info["task_id"], info["tools"]
        ep.messages = copy.deepcopy(obs)
        ep.resources = dict(info.get("resources") or {})
        declared = ep.resources.get("step_timeout_s")
        if step_timeout_s is None and isinstance(declared, (int, float)) and declared > 0:
            timeout = float(declared)
        while True:
            if max_turns is not None and ep.turns >= max_turns:
                _truncate(ep, "max_turns", f"runner max_turns={max_turns} reached before the env ended")
                break
            start = time.perf_counter()
            try:
                action = await asyncio.wait_for(agent(copy.deepcopy(ep.messages), copy.deepcopy(ep.tools)),
                                                agent_timeout_s)
            except EpisodeTruncated as exc:
                _truncate(ep, exc.cause, str(exc))
                break
            except asyncio.TimeoutError:
                raise _Failed(f"agent timed out after {agent_timeout_s:g} s") from None
            except Exception as exc:
                raise _Failed(f"agent raised {type(exc).__name__}: {exc}") from None
            finally:
                ep.timings["agent_s"] += time.perf_counter() - start
            try:
                validate_message(action, where="agent message")
                if action["role"] != "assistant":
                    raise MessageError(f"agent message role must be 'assistant', got {action['role']!r}")
            except MessageError as exc:
                raise _Failed(str(exc)) from None
            ep.messages.append(copy.deepcopy(action))
            ep.turns += 1
            out = await env_call("step", env.astep(action))
            new, reward, terminated, truncated, info = _check_step(out)
            ep.messages += new
            if terminated or truncated:
                ep.reward = reward
                ep.reward_detail = info.get("reward_detail", {})
                if truncated and not terminated:
                    ep.status = "truncated"
                break
    except _Failed as exc:
        ep.status, ep.error = "failed", str(exc)
        ep.reward, ep.reward_detail = 0.0, {}
    ep.timings["wall_s"] = time.perf_counter() - t0
    return ep


def _truncate(ep: Episode, cause: str, why: str) -> None:
    ep.status, ep.error = "truncated", why
    ep.reward, ep.reward_detail = 0.0, {"truncated_by": cause}


def _check_reset(out: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise MessageError(f"reset must return (messages, info), got {_describe(out)}")
        obs, info = out
        validate_messages(obs, where="reset messages")
        if not obs:
            raise MessageError("reset returned no messages")
        if not isinstance(info, dict) or not isinstance(info.get("tools"), list) or "task_id" not in info:
            raise MessageError("reset info must be a dict with 'tools' (a list) and 'task_id'")
    except MessageError as exc:
        raise _Failed(f"env reset returned garbage: {exc}") from None
    return copy.deepcopy(obs), copy.deepcopy(info)


def _check_step(out: Any) -> tuple[list[dict[str, Any]], float, bool, bool, dict[str, Any]]:
    try:
        if not (isinstance(out, tuple) and len(out) == 5):
            raise MessageError(f"step must return a 5-tuple, got {_describe(out)}")
        obs, reward, terminated, truncated, info = out
        validate_messages(obs, where="step messages")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise MessageError(f"reward must be a finite number, got {reward!r}")
        if not isinstance(terminated, bool) or not isinstance(truncated, bool):
            raise MessageError(f"terminated/truncated must be bools, got {terminated!r}/{truncated!r}")
        if not isinstance(info, dict):
            raise MessageError(f"info must be a dict, got {_describe(info)}")
        if (terminated or truncated) and not isinstance(info.get("reward_detail", {}), dict):
            raise MessageError("info['reward_detail'] must be a dict")
    except MessageError as exc:
        raise _Failed(f"env step returned garbage: {exc}") from None
    return copy.deepcopy(obs), float(reward), terminated, truncated, copy.deepcopy(info)


def _describe(x: Any) -> str:
    r = repr(x)
    return f"{type(x).__name__} {r[:80]}{'...' if len(r) > 80 else ''}"
