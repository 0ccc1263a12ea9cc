"""The chat-environment API: a `gymnasium.Env` whose observations and actions are chat messages.

An episode looks like this::

    messages, info = env.reset(seed=7)          # system/user messages; info["tools"], info["task_id"]
    while True:
        action = agent(messages, info["tools"])  # {"role": "assistant", "content": ..., "tool_calls": [...]}
        new, reward, terminated, truncated, info = env.step(action)
        messages += [action, *new]
        if terminated or truncated:
            break                                # info["reward_detail"] explains the reward

An assistant message with tool calls is answered with one tool message per call; a message
without tool calls is the final answer and ends the episode. A malformed tool call (bad JSON,
unknown tool, wrong argument types) is answered with a tool error message and the episode goes
on: teaching a policy to call tools well needs those mistakes to be visible, not fatal.

To write an environment, subclass `ChatEnv` and implement four hooks (`_new_task`, `_toolbox`,
`_verify`, `oracle_action`; `_initial_messages` is optional). The reward comes from `_verify`,
which reads the state the episode left behind (a database, a sandbox, the final answer).
"""

from __future__ import annotations

import asyncio
import copy
import json
import string
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces

from environments.tools import Toolbox, in_thread
from sandboxes.limits import Limits

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")


class MessageError(ValueError):
    """A chat message does not have the OpenAI shape."""


def validate_message(msg: Any, *, where: str = "message") -> None:
    """Raise `MessageError` naming the problem unless `msg` is an OpenAI chat message.

    Tool-call *arguments* are not parsed here: bad arguments are the agent's mistake, which
    the env answers with a tool error, not a protocol violation.
    """
    if not isinstance(msg, dict):
        raise MessageError(f"{where} must be a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise MessageError(f"{where}['role'] must be one of {ROLES}, got {role!r}")
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise MessageError(f"{where}['content'] must be a string or None, got {type(content).__name__}")
    calls = msg.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise MessageError(f"{where}: only assistant messages may carry tool_calls (role is {role!r})")
        if not isinstance(calls, list):
            raise MessageError(f"{where}['tool_calls'] must be a list, got {type(calls).__name__}")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise MessageError(f"{where}: a tool message needs a string 'tool_call_id'")


def validate_messages(msgs: Any, *, where: str = "messages") -> None:
    if not isinstance(msgs, list):
        raise MessageError(f"{where} must be a list of messages, got {type(msgs).__name__}")
    for i, m in enumerate(msgs):
        validate_message(m, where=f"{where}[{i}]")


class ChatMessages(spaces.Space[list]):
    """A list of chat messages (the observation space).

    Gymnasium has no text-message space; this one checks shape through `validate_messages`
    and samples short random user messages, enough for `gymnasium.utils.env_checker`.
    """

    def __init__(self, seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        try:
            validate_messages(x)
        except MessageError:
            return False
        return True

    def sample(self, mask: Any = None, probability: Any = None) -> list:
        return [{"role": "user", "content": _random_text(self.np_random)}]


class AssistantMessage(spaces.Space[dict]):
    """An assistant message (the action space).

    `sample()` draws the kind of noise an untrained policy produces: free text, calls to the
    env's tools with random arguments, calls to unknown tools, and unparsable JSON.
    """

    def __init__(self, tool_names: Sequence[str] = (), seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.tool_names = tuple(tool_names)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        try:
            validate_message(x)
        except MessageError:
            return False
        return x["role"] == "assistant"

    def sample(self, mask: Any = None, probability: Any = None) -> dict:
        rng = self.np_random
        kind = int(rng.integers(4))
        if kind == 0 or not self.tool_names:
            return {"role": "assistant", "content": _random_text(rng)}
        name = str(rng.choice(self.tool_names)) if kind != 2 else "no_such_tool"
        args = json.dumps({"x": _random_text(rng), "n": int(rng.integers(-5, 5))})
        if kind == 3:
            args = args[: len(args) // 2]  # truncated JSON
        call = {"id": f"call_{int(rng.integers(1 << 30))}", "type": "function",
                "function": {"name": name, "arguments": args}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}


def _random_text(rng: np.random.Generator) -> str:
    letters = list(string.ascii_lowercase + "0123456789 ")
    return "".join(rng.choice(letters, size=int(rng.integers(1, 24))))


@dataclass(frozen=True)
class Resources:
    """What one task needs to run: declared per task (like Harbor's task.toml), read by the runner."""

    sandbox_backend: str | None = None  # None: the task runs no untrusted code
    sandbox_image: str | None = None  # docker image; bwrap uses the host's read-only /usr
    limits: Limits | None = None
    step_timeout_s: float = 60.0
    max_turns: int = 8

    def as_dict(self) -> dict[str, Any]:
        return {"sandbox_backend": self.sandbox_backend, "sandbox_image": self.sandbox_image,
                "limits": None if self.limits is None else self.limits.model_dump(),
                "step_timeout_s": self.step_timeout_s, "max_turns": self.max_turns}


@dataclass(frozen=True)
class Task:
    """One problem instance. Families keep their private data in `data` (answers, tests, gold)."""

    task_id: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    resources: Resources = field(default_factory=Resources)


class ChatEnv(gymnasium.Env[list, dict], metaclass=ABCMeta):
    """Base class of every KPop environment. Subclasses implement the hooks below.

    `reset(options={"task_id": ...})` picks a task by id instead of by seed, so a stored
    trajectory can be replayed and re-graded.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, *, max_turns: int | None = None, render_mode: str | None = None, show_tools: bool = True):
        """`show_tools=False` leaves the tool schemas out of `info["tools"]` (so out of the prompt):
        the tools still work, but the policy must already know them, e.g. from cold-start SFT.
        Tiny policies learn far faster without a few hundred tokens of schema in every prompt."""
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.render_mode = render_mode
        self._max_turns_override = max_turns
        self.show_tools = show_tools
        self.observation_space = ChatMessages()
        self.action_space = AssistantMessage()
        self.task: Task | None = None
        self.tools: Toolbox = Toolbox([])
        self.transcript: list[Message] = []
        self._turns = 0
        self._done = True

    # ---- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        """Draw a task from `rng` (or look up `options["task_id"]`) and set up its fresh state."""

    def _initial_messages(self, task: Task) -> list[Message]:
        msgs: list[Message] = []
        if task.system:
            msgs.append({"role": "system", "content": task.system})
        msgs.append({"role": "user", "content": task.prompt})
        return msgs

    @abstractmethod
    def _toolbox(self, task: Task) -> Toolbox:
        """The tools of this episode, bound to its state."""

    @abstractmethod
    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        """Reward in [0, 1] and its explanation, read from the final state.

        `final` is the assistant's final message, or None when the episode was truncated.
        """

    @abstractmethod
    def oracle_action(self, messages: Sequence[Message]) -> Message:
        """The oracle's next assistant message, given the conversation so far.

        Following it from `reset` to the end must earn reward 1; `kpop env check` verifies that.
        """

    # ---- gymnasium API -----------------------------------------------------------------------
    @property
    def max_turns(self) -> int:
        if self._max_turns_override is not None:
            return self._max_turns_override
        return self.task.resources.max_turns if self.task else 8

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        self.task = self._new_task(self.np_random, dict(options or {}))
        self.tools = self._toolbox(self.task)
        self.action_space = AssistantMessage(self.tools.names, seed=int(self.np_random.integers(1 << 31)))
        self._turns = 0
        self._done = False
        first = self._initial_messages(self.task)
        self.transcript = copy.deepcopy(first)
        return first, self._info()

    def step(self, action: Message):
        calls = self._accept(action)
        if not calls:
            return self._final(action)
        return self._after_tools([self.tools.call(c) for c in calls])

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Async `reset`; the default runs the sync one in a thread (`in_thread`) so the event loop stays free."""
        return await in_thread(self.reset, seed=seed, options=options)

    async def astep(self, action: Message):
        """Async `step`: coroutine tools are awaited on the loop (concurrently), the rest runs in a thread."""
        if not self.tools.has_async:
            return await in_thread(self.step, action)
        calls = self._accept(action)
        if not calls:
            return await in_thread(self._final, action)
        new = list(await asyncio.gather(*(self.tools.acall(c) for c in calls)))
        return await in_thread(self._after_tools, new)  # may run the verifier

    # The three stages of a step, shared by `step` and `astep`.
    def _accept(self, action: Message) -> list[Any]:
        if self._done or self.task is None:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        validate_message(action, where="action")
        if action["role"] != "assistant":
            raise MessageError(f"action['role'] must be 'assistant', got {action['role']!r}")
        self.transcript.append(copy.deepcopy(action))
        self._turns += 1
        return action.get("tool_calls") or []

    def _after_tools(self, new: list[Message]):
        self.transcript += copy.deepcopy(new)
        if self._turns < self.max_turns:
            return new, 0.0, False, False, self._info()
        self._done = True
        reward, detail = self._verify(None)
        return new, float(reward), False, True, self._info(reward_detail=detail)

    def _final(self, action: Message):
        self._done = True
        reward, detail = self._verify(action)
        return [], float(reward), True, False, self._info(reward_detail=detail)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lines = []
        for m in self.transcript:
            lines.append(f"[{m['role']}] {m.get('content') or ''}")
            for c in m.get("tool_calls") or []:
                fn = c.get("function", {}) if isinstance(c, dict) else {}
                lines.append(f"  -> {fn.get('name')}({fn.get('arguments')})")
        return "\n".join(lines)

    # ---- helpers -----------------------------------------------------------------------------
    def _info(self, **extra: Any) -> dict[str, Any]:
        assert self.task is not None
        info = {"tools": self.tools.schemas() if self.show_tools else [], "task_id": self.task.task_id, "turn": self._turns,
                "resources": self.task.resources.as_dict()}
        info.update(extra)
        return copy.deepcopy(info)  # callers may mutate what they get; gymnasium's checker verifies this


Agent = Callable[[list[Message], list[dict[str, Any]]], Awaitable[Message]]


def oracle_agent(env: ChatEnv) -> Agent:
    """The env's oracle as an async agent for `run_episode` (demonstrations, `kpop env check`)."""

    async def agent(messages: list[Message], tools: list[dict[str, Any]]) -> Message:
        return env.oracle_action(messages)

    return agent


def assistant(content: str | None = None, *calls: tuple[str, dict[str, Any]]) -> Message:
    """Build an assistant message, e.g. `assistant(None, ("calculator", {"expression": "2+2"}))`."""
    msg: Message = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                              "function": {"name": n, "arguments": json.dumps(a)}}
                             for i, (n, a) in enumerate(calls)]
    return msg


def count_assistant_turns(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")
