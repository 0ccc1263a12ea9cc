"""run_episode survives envs and agents that raise, hang or return garbage, and says why."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import numpy as np
import pytest

from environments import ChatEnv, Resources, Task, Toolbox, assistant, run_episode
from environments.core import oracle_agent
from environments.runner import EpisodeTruncated


class Faulty(ChatEnv):
    """Answers "ok" for reward 1, unless `fault` makes one of its calls misbehave."""

    def __init__(self, fault: str | None = None, declared_timeout_s: float = 60.0, **kw: Any):
        super().__init__(**kw)
        self.fault = fault
        self.declared_timeout_s = declared_timeout_s
        self.release = threading.Event()  # a hanging call blocks until the test sets this
        self.verified = 0

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if self.fault == "reset_raises":
            raise OSError("disk on fire")
        if self.fault == "reset_hangs":
            self.release.wait(60)
        return Task(task_id="t/0", prompt="say ok", resources=Resources(step_timeout_s=self.declared_timeout_s))

    def _toolbox(self, task: Task) -> Toolbox:
        def ping() -> str:
            """Ping."""
            return "pong"

        return Toolbox([ping])

    def _verify(self, final):
        self.verified += 1
        return float((final or {}).get("content") == "ok"), {}

    def oracle_action(self, messages):
        return assistant("ok")

    def step(self, action):
        out = super().step(action)
        garbage = {
            "step_raises": RuntimeError("verifier crashed"),
            "step_short": (out[0], out[1]),
            "step_nan": (out[0], math.nan, *out[2:]),
            "step_bad_msgs": ([{"role": "tool", "content": 3}], *out[1:]),
            "step_np_bool": (out[0], out[1], np.bool_(out[2]), out[3], out[4]),
            "step_exits": SystemExit(3),
        }
        if self.fault == "step_hangs":
            self.release.wait(60)
        if self.fault in garbage:
            g = garbage[self.fault]
            if isinstance(g, BaseException):
                raise g
            return g
        return out

    def reset(self, *, seed=None, options=None):
        out = super().reset(seed=seed, options=options)
        if self.fault == "reset_garbage":
            return out[0]
        return out


def run(env, agent=None, **kw):
    return asyncio.run(run_episode(env, agent or oracle_agent(env), seed=0, **kw))


def test_ok_episode_has_timings():
    ep = run(Faulty(declared_timeout_s=7.0))
    assert (ep.status, ep.reward, ep.error, ep.task_id, ep.turns) == ("ok", 1.0, None, "t/0", 1)
    assert ep.resources["step_timeout_s"] == 7.0  # the task's declaration reaches the record
    assert ep.messages[-1] == {"role": "assistant", "content": "ok"}
    assert ep.tools[0]["function"]["name"] == "ping"
    assert ep.timings["wall_s"] >= ep.timings["env_s"] > 0 and ep.timings["agent_s"] >= 0
    assert ep.to_dict()["status"] == "ok"


@pytest.mark.parametrize("fault, reason", [
    ("reset_raises", "env reset raised OSError: disk on fire"),
    ("reset_hangs", "env reset timed out after 0.3 s"),
    ("reset_garbage", "env reset returned garbage: reset must return (messages, info)"),
    ("step_raises", "env step raised RuntimeError: verifier crashed"),
    ("step_hangs", "env step timed out after 0.3 s"),
    ("step_short", "step must return a 5-tuple"),
    ("step_nan", "reward must be a finite number"),
    ("step_bad_msgs", "content'] must be a string"),
    ("step_np_bool", "terminated/truncated must be bools"),
    ("step_exits", "env step raised RuntimeError: SystemExit(3)"),
])
def test_env_faults_fail_the_episode_with_the_reason(fault, reason):
    env = Faulty(fault)
    try:
        ep = run(env, step_timeout_s=0.3)
        assert ep.status == "failed" and reason in ep.error and ep.reward == 0.0
        # a hung call is abandoned: the episode is over while the env's thread is still blocked
        assert not env.release.is_set()
    finally:
        env.release.set()


def test_the_task_declares_its_step_timeout():
    env = Faulty("step_hangs", declared_timeout_s=0.2)
    try:
        ep = run(env)
        assert ep.status == "failed" and "env step timed out after 0.2 s" in ep.error
    finally:
        env.release.set()


def test_agent_faults_fail_the_episode():
    async def raises(messages, tools):
        raise ValueError("model server down")

    async def garbage(messages, tools):
        return {"role": "user", "content": "hi"}

    async def slow(messages, tools):
        await asyncio.sleep(5)

    assert "agent raised ValueError: model server down" in run(Faulty(), raises).error
    assert "role must be 'assistant'" in run(Faulty(), garbage).error
    assert "agent timed out after 0.1 s" in run(Faulty(), slow, agent_timeout_s=0.1).error


def test_runner_turn_cap_truncates():
    async def pinger(messages, tools):
        return assistant(None, ("ping", {}))

    env = Faulty()
    ep = run(env, pinger, max_turns=2)
    assert ep.status == "truncated" and ep.turns == 2 and "max_turns=2" in ep.error
    assert ep.reward == 0.0 and ep.reward_detail == {"truncated_by": "max_turns"} and env.verified == 0
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant", "tool"]
    env_cap = Faulty(max_turns=3)
    ep = run(env_cap, pinger)  # the env's own limit: truncated, graded by its verifier
    assert ep.status == "truncated" and ep.turns == 3 and ep.error is None and env_cap.verified == 1


def test_an_agent_out_of_budget_truncates_without_grading():
    """An agent that cannot finish its turn (a full context) ends the episode as truncated with
    reward 0: its cut text never reaches the env, so the verifier cannot grade it as an answer."""

    class OutOfTokens(EpisodeTruncated):
        cause = "max_episode_tokens"

    async def rambler(messages, tools):
        if sum(m["role"] == "assistant" for m in messages) == 1:
            raise OutOfTokens("no room left for turn 2")
        return assistant(None, ("ping", {}))

    env = Faulty()
    ep = run(env, rambler)
    assert (ep.status, ep.reward, ep.turns, ep.error) == ("truncated", 0.0, 1, "no room left for turn 2")
    assert ep.reward_detail == {"truncated_by": "max_episode_tokens"} and env.verified == 0
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool"]


def test_agent_cannot_mutate_the_record():
    async def vandal(messages, tools):
        messages.clear()
        tools.clear()
        return assistant("ok")

    ep = run(Faulty(), vandal)
    assert ep.messages[0]["content"] == "say ok" and ep.tools


def test_bad_runner_arguments():
    with pytest.raises(ValueError, match="step_timeout_s"):
        run(Faulty(), step_timeout_s=0)
