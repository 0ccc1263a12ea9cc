"""`kpop env check`: does an environment keep the API's promises?

Checks, each reported separately:
  make          -- the id resolves and builds a `ChatEnv`.
  gymnasium     -- `gymnasium.utils.env_checker.check_env`: return types, seeded-reset and
                   step determinism, fresh (unshared) observations and infos, render, close.
                   Its numeric space checks (Box bounds, dtypes, flattening) do not apply to
                   chat messages; the custom spaces in `environments.core` supply `contains`
                   and `sample`, and the `messages` check below covers the message shapes.
  messages      -- reset gives valid OpenAI messages and tool schemas, seeds give different
                   tasks, the same seed gives the same task, and `options={"task_id": ...}`
                   replays a task exactly.
  oracle        -- the oracle earns reward 1 on a sample of seeds.
  random        -- episodes of random actions (`action_space.sample()`) end without failing.
  malformed     -- bad JSON, an unknown tool and wrongly typed arguments each come back as a
                   tool error message, and the episode goes on (then a wrong final answer).
  after_end     -- the episode contract: once a step returned terminated or truncated, the
                   next `step()` raises (ChatEnv raises RuntimeError) instead of going on,
                   and `reset()` starts a new episode.

Every episode's reward must lie in [0, 1] (REWARD_RANGE): 0 = failed, 1 = fully solved, partial
credit in between. Group-normalised advantages, pass@k thresholds and the reports all assume it,
so a reward of -1 for a wrong answer or 10 for a right one is a failed check, not a style choice.
Each failure says what to change in the env's code.
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
REWARD_RANGE = (0.0, 1.0)


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
    if len(seeds) > 2 and len(set(ids)) == 1:
        raise AssertionError(
            f"reset(seed=...) with seeds {list(seeds)} gave the same task {ids[0]!r} every time: _new_task must "
            "draw its task from its `rng` argument (a numpy Generator that reset(seed=...) seeds), not from a fixed "
            "choice or Python's global `random`")
    again, info = env.reset(seed=seeds[0])
    if info["task_id"] != ids[0]:
        raise AssertionError(
            f"reset(seed={seeds[0]}) gave task {ids[0]!r} and then {info['task_id']!r}: the same seed must give the "
            "same task, so draw everything from the `rng` argument of _new_task (no global random, no clock)")
    return {"task_ids": ids}


def _episodes(env: ChatEnv, seeds: Sequence[int], agent_for: Callable[[ChatEnv], Any], *, want_reward: float | None,
              step_timeout_s: float) -> dict[str, Any]:
    out, problems = [], []
    lo, hi = REWARD_RANGE
    for seed in seeds:
        ep = asyncio.run(run_episode(env, agent_for(env), seed=seed, step_timeout_s=step_timeout_s))
        out.append({"seed": seed, "task_id": ep.task_id, "status": str(ep.status), "reward": ep.reward,
                    "turns": ep.turns, "error": ep.error})
        where = f"seed {seed} ({ep.task_id})"
        if ep.status == "failed":
            problems.append(f"{where}: the episode failed: {ep.error}")
        elif not lo <= ep.reward <= hi:
            problems.append(
                f"{where}: reward {ep.reward:g} is outside [{lo:g}, {hi:g}]. KPop relies on rewards in [0, 1] "
                f"(0 = failed, 1 = fully solved, partial credit between): make _verify return a score in that "
                f"range (verifier detail: {ep.reward_detail})")
        elif want_reward is not None and abs(ep.reward - want_reward) > 1e-9:
            problems.append(
                f"{where}: the oracle earned reward {ep.reward:g}, not {want_reward:g}. Following oracle_action from "
                f"reset to the end must fully solve the task; check oracle_action and _verify against each other "
                f"(verifier detail: {ep.reward_detail})")
    if problems:
        raise AssertionError("\n".join(problems))  # one problem per line
    return {"episodes": out}


def _after_end(env: ChatEnv, seed: int) -> dict[str, Any]:
    """Play the oracle to the end with the sync API, then step once more: that must raise."""
    obs, _ = env.reset(seed=seed)
    messages = list(obs)
    for _ in range(64):
        action = env.oracle_action(messages)
        new, _, terminated, truncated, _ = env.step(action)
        messages += [action, *new]
        if terminated or truncated:
            break
    else:
        raise AssertionError("the oracle's episode did not end within 64 steps (terminated or truncated never set)")
    try:
        more = env.step({"role": "assistant", "content": "one more answer after the end"})
    except Exception as exc:  # the contract: an ended episode refuses more actions
        refused = f"{type(exc).__name__}: {exc}"
    else:
        raise AssertionError(
            f"step() after the episode ended returned {str(more)[:200]} instead of raising. Once a step returns "
            "terminated=True or truncated=True the episode is over: step() must raise until reset() (ChatEnv.step "
            "raises RuntimeError; an env that overrides step() should call self._accept(action) first)")
    env.reset(seed=seed)
    return {"step_after_end_raised": refused}


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
        results.append(_run("after_end", lambda: _after_end(env, seed)))
        env.close()
    return {"env_id": env_id, "ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}
