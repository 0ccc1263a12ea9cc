"""The env API: tool schemas, malformed tool calls, message validation, the ChatEnv step contract."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Literal, Sequence

import numpy as np
import pytest

from environments import (ChatEnv, MessageError, Task, Toolbox, ToolError, assistant, make_tool, oracle_agent,
                          run_episode, tool, validate_message)


@tool
def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Args:
        a: the first one.
        b: the second one,
            defaulting to two.
    """
    return a + b


@tool(name="scale-it")
def scale(x: float, unit: Literal["m", "km"] = "m", tags: list[str] | None = None) -> dict[str, Any]:
    """Scale a length."""
    if x < 0:
        raise ToolError("x must be >= 0")
    return {"m": x if unit == "m" else x * 1000, "tags": tags or []}


def test_schema_from_signature_and_docstring():
    s = add.schema()
    assert s["type"] == "function"
    fn = s["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers."
    params = fn["parameters"]
    assert params["type"] == "object" and params["required"] == ["a"] and params["additionalProperties"] is False
    assert params["properties"]["a"] == {"type": "integer", "description": "the first one."}
    assert params["properties"]["b"]["default"] == 2
    assert params["properties"]["b"]["description"] == "the second one, defaulting to two."
    props = scale.schema()["function"]["parameters"]["properties"]
    assert scale.name == "scale-it"
    assert props["unit"]["enum"] == ["m", "km"]
    assert "anyOf" in props["tags"]  # list[str] | None
    json.dumps(scale.schema())


def test_untyped_parameter_is_rejected_with_its_name():
    def f(x):  # noqa: ANN001
        return x

    with pytest.raises(TypeError, match="'x' needs a type hint"):
        make_tool(f)


def _call(name: str, args: Any, cid: str = "c1") -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


@pytest.mark.parametrize("call, fragment", [
    (_call("add", '{"a": 1'), "not valid JSON"),
    (_call("nope", "{}"), "unknown tool 'nope'"),
    (_call("add", '{"a": "1"}'), "a: Input should be a valid integer"),
    (_call("add", '{"a": 1, "c": 3}'), "c: Extra inputs are not permitted"),
    (_call("add", "{}"), "a: Field required"),
    (_call("add", "[1, 2]"), "must be a JSON object"),
    (_call("scale-it", '{"x": 1, "unit": "mi"}'), "unit: Input should be 'm' or 'km'"),
    (_call("scale-it", '{"x": -1}'), "x must be >= 0"),  # ToolError raised by the tool
    ({"id": "c1", "function": "add"}, "needs function.name"),
    ("add(1, 2)", "must be an object"),
])
def test_malformed_calls_become_tool_errors(call, fragment):
    box = Toolbox([add, scale])
    msg = box.call(call)
    assert msg["role"] == "tool" and msg["content"].startswith("error:")
    assert fragment in msg["content"]
    assert asyncio.run(box.acall(call)) == msg


def test_good_calls_and_dict_arguments():
    box = Toolbox([add, scale])
    assert box.call(_call("add", '{"a": 40}'))["content"] == "42"
    assert box.call(_call("add", {"a": 1, "b": 2}))["content"] == "3"
    out = json.loads(box.call(_call("scale-it", '{"x": 2, "unit": "km"}'))["content"])
    assert out == {"m": 2000.0, "tags": []}  # int accepted for float (strict JSON types)


def test_env_bug_in_a_tool_propagates():
    def broken(x: int) -> int:
        """Crash."""
        return 1 // 0

    with pytest.raises(ZeroDivisionError):
        Toolbox([broken]).call(_call("broken", '{"x": 1}'))


def test_duplicate_tool_names_rejected():
    with pytest.raises(ValueError, match="duplicate tool name 'add'"):
        Toolbox([add, add])


@pytest.mark.parametrize("msg, fragment", [
    ("hi", "must be a dict"),
    ({"role": "robot", "content": "x"}, "must be one of"),
    ({"role": "assistant", "content": 3}, "content'] must be a string"),
    ({"role": "assistant", "content": None, "tool_calls": "add"}, "tool_calls'] must be a list"),
    ({"role": "user", "content": "x", "tool_calls": []}, "only assistant messages"),
    ({"role": "tool", "content": "x"}, "tool_call_id"),
])
def test_message_validation_names_the_problem(msg, fragment):
    with pytest.raises(MessageError, match=fragment):
        validate_message(msg)


class EchoEnv(ChatEnv):
    """A tiny env with one async tool: it remembers a secret number the agent must report."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.loop_threads: set[int] = set()

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        n = int(options.get("task_id", "echo/%d" % rng.integers(100)).split("/")[1])
        return Task(task_id=f"echo/{n}", prompt="What is the secret?", data={"secret": n})

    def _toolbox(self, task: Task) -> Toolbox:
        async def secret() -> int:
            """Reveal the secret."""
            self.loop_threads.add(threading.get_ident())
            await asyncio.sleep(0)
            return task.data["secret"]

        return Toolbox([secret])

    def _verify(self, final):
        got = (final or {}).get("content")
        ok = got == str(self.task.data["secret"])
        return float(ok), {"got": got}

    def oracle_action(self, messages: Sequence[dict]) -> dict:
        if messages[-1]["role"] == "tool":
            return assistant(messages[-1]["content"])
        return assistant(None, ("secret", {}))


def test_step_contract_and_async_tools():
    env = EchoEnv(max_turns=3)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(assistant("x"))
    obs, info = env.reset(seed=1)
    assert obs == [{"role": "user", "content": "What is the secret?"}]
    assert info["task_id"].startswith("echo/") and info["tools"][0]["function"]["name"] == "secret"
    with pytest.raises(MessageError, match="must be 'assistant'"):
        env.step({"role": "user", "content": "x"})
    ep = asyncio.run(run_episode(env, oracle_agent(env), seed=1))
    assert ep.status == "ok" and ep.reward == 1.0 and ep.turns == 2
    assert threading.main_thread().ident in env.loop_threads  # awaited on the loop, not in a worker thread


def test_truncation_gives_a_verified_reward():
    env = EchoEnv(max_turns=2, render_mode="ansi")
    env.reset(seed=0)
    env.step(assistant(None, ("secret", {})))
    obs, reward, terminated, truncated, info = env.step(assistant(None, ("secret", {})))
    assert (terminated, truncated, reward) == (False, True, 0.0)
    assert info["reward_detail"] == {"got": None}
    assert "secret" in env.render()
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step(assistant("1"))


def test_missing_hooks_fail_at_construction():
    class Half(ChatEnv):
        def _new_task(self, rng, options):
            return Task(task_id="h/0", prompt="hi")

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        EchoEnv(max_turns=0)
    with pytest.raises(ValueError, match="render_mode"):
        EchoEnv(render_mode="human")
