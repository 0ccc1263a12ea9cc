"""`kpop env check`: does an environment keep the API's promises?

Checks, each reported separately:
  make          -- the id resolves and builds a `ChatEnv`.
  gymnasium     -- `gymnasium.utils.env_checker.check_env`: return types, seeded-reset and
                   step determinism, fresh (unshared) observations and infos, render, close.
                   Its numeric space checks (Box bounds, dtypes, flattening) do not apply to
                   chat messages; the custom spaces in `environments.core` supply `contains`
                   and `sample`, and the `messages` check below covers the message shapes.
  messages      -- reset gives valid OpenAI messages and tool schemas, seeds give different
                   tasks, and `options={"task_id": ...}` replays a task exactly.
  oracle        -- the oracle earns reward 1 on a sample of seeds.
  random        -- episodes of random actions (`action_space.sample()`) end without failing.
  malformed     -- bad JSON, an unknown tool and wrongly typed arguments each come back as a
                   tool error message, and the episode goes on.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from gymnasium.utils.env_checker import check_env as gymnasium_check_env

from environments.core import ChatEnv, Message, assistant, oracle_agent, validate_messages
from environments.registry import make
from environments.runner import run_episode


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: Any
    duration_s: float


def _run(name: str, fn: Callable[[], Any]) -> CheckResult:
    t0 = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # a failed check is a result, not a crash
        ok = False
        detail = {"error": f"{type(exc).__name__}: {exc}",
                  "where": traceback.format_exc(limit=-3).strip().splitlines()[-4:]}
    return CheckResult(name, ok, detail, round(time.perf_counter() - t0, 3))


def _gymnasium(env: ChatEnv) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gymnasium_check_env(env)
    return {"warnings": sorted({_ANSI.sub("", str(w.message))[:200] for w in caught})}


def _messages(env: ChatEnv, seeds: Sequence[int]) -> dict[str, Any]:
    ids = []
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        validate_messages(obs, where=f"reset(seed={seed}) messages")
        assert obs, "reset returned no messages"
        assert isinstance(info.get("task_id"), str), "info['task_id'] must be a string"
        tools = info.get("tools")
        assert isinstance(tools, list), "info['tools'] must be a list"
        for t in tools:
            fn = t.get("function", {}) if isinstance(t, dict) else {}
            assert t.get("type") == "function" and isinstance(fn.get("name"), str), f"bad tool schema {t!r}"
            assert fn.get("parameters", {}).get("type") == "object", \
                f"tool {fn.get('name')}: parameters must be an object schema"
            json.dumps(t)
        replay, _ = env.reset(options={"task_id": info["task_id"]})
        assert replay == obs, f"reset(options={{'task_id': {info['task_id']!r}}}) did not replay the task"
        ids.append(info["task_id"])
    if len(seeds) > 2:
        assert len(set(ids)) > 1, f"every seed gave the same task {ids[0]!r}"
    return {"task_ids": ids}


def _episodes(env: ChatEnv, seeds: Sequence[int], agent_for: Callable[[ChatEnv], Any], *, want_reward: float | None,
              step_timeout_s: float) -> dict[str, Any]:
    out, problems = [], []
    for seed in seeds:
        ep = asyncio.run(run_episode(env, agent_for(env), seed=seed, step_timeout_s=step_timeout_s))
        out.append({"seed": seed, "task_id": ep.task_id, "status": ep.status, "reward": ep.reward,
                    "turns": ep.turns, "error": ep.error})
        if ep.status == "failed":
            problems.append(f"seed {seed}: episode failed: {ep.error}")
        elif want_reward is not None and abs(ep.reward - want_reward) > 1e-9:
            problems.append(f"seed {seed} ({ep.task_id}): reward {ep.reward}, expected {want_reward}; "
                            f"detail {ep.reward_detail}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"episodes": out}


def _random_agent(env: ChatEnv):
    async def agent(messages: list[Message], tools: list[dict[str, Any]]) -> Message:
        return env.action_space.sample()

    return agent


def _malformed_agent(env: ChatEnv):
    """Turn 1: three broken tool calls (checked to come back as errors); turn 2: a wrong answer."""

    async def agent(messages: list[Message], tools: list[dict[str, Any]]) -> Message:
        last = messages[-1]
        if last["role"] != "tool":
            real = tools[0]["function"] if tools else {"name": "x", "parameters": {"properties": {}}}
            wrong_types = {p: [[]] for p in real.get("parameters", {}).get("properties", {})} or {"bogus": 1}
            msg = assistant(None, ("no_such_tool", {}), (real["name"], wrong_types), (real["name"], {}))
            msg["tool_calls"][2]["function"]["arguments"] = '{"unterminated": '
            return msg
        errors = [m for m in messages if m["role"] == "tool"]
        bad = [m["content"] for m in errors if not (m.get("content") or "").startswith("error:")]
        if len(errors) != 3 or bad:
            raise AssertionError(f"malformed tool calls were not all answered with errors: {bad or errors}")
        return assistant("I do not know.")

    return agent


def check_env(env_id: str, *, env_kwargs: dict[str, Any] | None = None, n_oracle: int = 3, n_random: int = 3,
              n_malformed: int = 1, seed: int = 0, step_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run every check on `env_id`; `{"env_id", "ok", "checks": [{name, ok, detail, duration_s}]}`."""
    results: list[CheckResult] = []
    holder: dict[str, ChatEnv] = {}

    def build() -> dict[str, Any]:
        holder["env"] = make(env_id, **(env_kwargs or {}))
        return {"class": f"{type(holder['env']).__module__}.{type(holder['env']).__qualname__}"}

    results.append(_run("make", build))
    if "env" in holder:
        env = holder["env"]
        seeds = list(range(seed, seed + max(n_oracle, 3)))
        results.append(_run("gymnasium", lambda: _gymnasium(env)))
        results.append(_run("messages", lambda: _messages(env, seeds)))
        results.append(_run("oracle", lambda: _episodes(env, seeds[:n_oracle], oracle_agent, want_reward=1.0,
                                                        step_timeout_s=step_timeout_s)))
        results.append(_run("random", lambda: _episodes(env, [seed + 100 + i for i in range(n_random)], _random_agent,
                                                        want_reward=None, step_timeout_s=step_timeout_s)))
        results.append(_run("malformed", lambda: _episodes(env, [seed + 200 + i for i in range(n_malformed)],
                                                           _malformed_agent, want_reward=None,
                                                           step_timeout_s=step_timeout_s)))
        env.close()
    return {"env_id": env_id, "ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}
