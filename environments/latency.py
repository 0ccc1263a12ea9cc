"""`kpop/latency-v0`: any KPop environment with long-tailed step latency, for benchmarks and tests.

Not a built-in task (`kpop env list` does not show it): importing this module registers it, and
the id `environments.latency:kpop/latency-v0` imports it wherever the env is made (Ray workers).

Agentic environments are slow in an uneven way: most tool calls return in milliseconds, a few
(a compile, a web fetch, a container start) take seconds. That tail is what makes synchronous
RL wait and asynchronous RL pay off, so `bench/async_vs_sync.py` and the controller tests wrap a
real environment in this one instead of inventing a fake workload:

    make("kpop/latency-v0", inner="kpop/tooluse-v0", inner_kwargs={"difficulty": 0},
         fast_s=0.02, slow_s=2.0, p_slow=0.2, sigma=0.5)

Each episode is drawn slow with probability `p_slow` (from the reset seed, so it is
reproducible); each of its steps then sleeps `fast_s` or `slow_s` times a lognormal(0, sigma)
factor before the inner step runs. `astep` sleeps with `asyncio.sleep`, so a slow episode does
not block generation for the others on the same worker. Rewards, tools and the oracle are the
inner environment's, unchanged.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any, Sequence

from environments.core import ChatEnv, Message, Task
from environments.registry import make, register
from environments.tools import Toolbox


class LatencyEnv(ChatEnv):
    def __init__(
        self,
        inner: str = "kpop/tooluse-v0",
        inner_kwargs: dict[str, Any] | None = None,
        *,
        fast_s: float = 0.02,
        slow_s: float = 2.0,
        p_slow: float = 0.1,
        sigma: float = 0.5,
        max_turns: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if inner.rpartition(":")[2] == "kpop/latency-v0":
            raise ValueError("kpop/latency-v0 cannot wrap itself: give inner an ordinary environment")
        if fast_s < 0 or slow_s < 0 or sigma < 0:
            raise ValueError(f"fast_s, slow_s and sigma must be >= 0, got {fast_s}, {slow_s}, {sigma}")
        if not 0.0 <= p_slow <= 1.0:
            raise ValueError(f"p_slow must be in [0, 1], got {p_slow}")
        super().__init__(max_turns=max_turns, render_mode=render_mode)
        self.inner = make(inner, **(inner_kwargs or {}))
        if max_turns is not None:
            self.inner._max_turns_override = max_turns
        self.fast_s, self.slow_s, self.p_slow, self.sigma = fast_s, slow_s, p_slow, sigma
        self.slow = False
        self._rng = random.Random(0)

    # -- latency ---------------------------------------------------------------------------------
    def next_delay(self) -> float:
        """Seconds the next step will wait (drawn per step; the episode's class is fixed at reset)."""
        base = self.slow_s if self.slow else self.fast_s
        return base * math.exp(self._rng.gauss(0.0, self.sigma)) if self.sigma else base

    def _draw_episode(self, seed: int | None) -> None:
        # a string seed: reproducible per task seed, independent of the inner env's own rng
        self._rng = random.Random(f"latency:{seed}") if seed is not None else random.Random()
        self.slow = self._rng.random() < self.p_slow

    def _mirror(self) -> None:
        self.task, self.tools, self.action_space = self.inner.task, self.inner.tools, self.inner.action_space

    # -- gymnasium API: the inner env's, with a sleep before each step ----------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        out = self.inner.reset(seed=seed, options=options)
        self._draw_episode(seed)
        self._mirror()
        return out

    def step(self, action: Message):
        time.sleep(self.next_delay())
        return self.inner.step(action)

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        out = await self.inner.areset(seed=seed, options=options)
        self._draw_episode(seed)
        self._mirror()
        return out

    async def astep(self, action: Message):
        await asyncio.sleep(self.next_delay())
        return await self.inner.astep(action)

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        return self.inner.oracle_action(messages)

    def render(self) -> str | None:
        return self.inner.render()

    def close(self) -> None:
        self.inner.close()

    # The hooks belong to the inner env; reset/step above never call these.
    def _new_task(self, rng: Any, options: dict[str, Any]) -> Task:
        raise NotImplementedError("LatencyEnv delegates tasks to its inner env")

    def _toolbox(self, task: Task) -> Toolbox:
        raise NotImplementedError("LatencyEnv delegates tools to its inner env")

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        raise NotImplementedError("LatencyEnv delegates verification to its inner env")


register("kpop/latency-v0", "environments.latency:LatencyEnv")
