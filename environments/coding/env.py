"""Coding: write or fix a Python function; hidden unit tests run in a sandbox decide the reward.

The agent may try code with the `run_python` tool (same sandbox, same limits) and ends with a
message holding the solution in a ```python block (or bare code). A completion that does not
define the entry point is taken as a body and appended to the prompt, as HumanEval does.
Reward: 1 if the hidden tests pass, else 0.

Grading (environments/coding/grader.py) runs the solution in a process of its own that never
holds the tests or the verdict: the tests run in a separate grader process and call the
solution's function through a pipe that carries plain data only, and the verdict is the
grader's own stdout line with a per-run nonce. Nothing the solution prints, patches, plants or
kills can turn a failing answer into a pass. The sandbox is emptied before grading, so files
the agent left with run_python play no part.

The sandbox comes from a `SandboxPool` when one is given (a rollout worker's: the episode
pays no sandbox start and the pool cleans the sandbox between episodes), else the env starts
its own and keeps it across its episodes.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from environments.coding.tasks import CodingTask, generated, humaneval
from environments.core import ChatEnv, Message, Resources, Task, assistant
from environments.tools import Tool, Toolbox, make_tool
from sandboxes.base import SandboxDeadError
from sandboxes.limits import Limits

if TYPE_CHECKING:
    from sandboxes import Sandbox, SandboxPool

DEFAULT_LIMITS = Limits(wall_time_s=10.0, cpu_time_s=10.0, memory_mb=512, max_pids=32, file_size_mb=16)
OUTPUT_CHARS = 2000
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


GRADER_SOURCE = Path(__file__).with_name("grader.py").read_text()


def extract_code(text: str) -> str:
    """The last fenced code block of `text`, or all of it when there is no fence."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def solution_program(task: CodingTask, answer: str) -> str:
    code = extract_code(answer)
    if not re.search(rf"^\s*def\s+{re.escape(task.entry_point)}\s*\(", code, re.M):
        code = task.prompt + code  # a completion: the body only
    return code


def _prompt(t: CodingTask) -> str:
    what = ("The Python function below has a bug. Fix it." if t.fix
            else "Complete the Python function below.")
    return (f"{what} Hidden unit tests will check it. You can try code with run_python. "
            f"Reply with the complete function in a ```python block.\n\n```python\n{t.prompt}```")


class CodingEnv(ChatEnv):
    def __init__(self, source: Literal["mixed", "humaneval", "generated"] = "mixed", backend: str = "bwrap",
                 image: str | None = None, limits: Limits | dict[str, Any] | None = None,
                 max_turns: int | None = None, render_mode: str | None = None,
                 sandbox_pool: "SandboxPool | None" = None):
        super().__init__(max_turns=max_turns, render_mode=render_mode)
        if source not in ("mixed", "humaneval", "generated"):
            raise ValueError(f"source must be 'mixed', 'humaneval' or 'generated', got {source!r}")
        if backend not in ("bwrap", "docker"):
            raise ValueError(f"backend must be 'bwrap' or 'docker', got {backend!r}")
        self.source, self.backend, self.image = source, backend, image
        self.limits = Limits.model_validate(limits) if isinstance(limits, dict) else (limits or DEFAULT_LIMITS)
        self._pool = sandbox_pool
        self._sandbox: "Sandbox | None" = None
        self._tool: Tool = make_tool(self.run_python)
        self.coding_task: CodingTask | None = None

    # The sandbox outlives episodes: reset() empties it, which is far cheaper than a new one.
    def sandbox(self) -> "Sandbox":
        if self._sandbox is not None and not self._sandbox.alive:
            self._release()
        if self._sandbox is None:
            if self._pool is not None:
                self._sandbox = self._pool.take(self.backend, self.image, self.limits)  # type: ignore[arg-type]
            else:
                from sandboxes import create_sandbox  # lazy: listing envs must not need a sandbox backend

                self._sandbox = create_sandbox(backend=self.backend, image=self.image, limits=self.limits)  # type: ignore[arg-type]
        return self._sandbox

    def _release(self) -> None:
        """Give the sandbox back to the pool (which resets it) or close our own."""
        sb, self._sandbox = self._sandbox, None
        if sb is not None:
            if self._pool is not None:
                self._pool.put(sb)
            else:
                sb.close()

    def run_python(self, code: str) -> str:
        """Run a Python program in the sandbox and show its exit code, stdout and stderr.

        Args:
            code: the program's source.
        """
        sb = self.sandbox()
        sb.write_file("scratch.py", code)
        res = sb.exec(["python3", "scratch.py"])
        status = ("timed out" if res.timed_out else "killed: out of memory" if res.oom_killed
                  else f"exit code {res.exit_code}")
        return f"{status}\nstdout:\n{res.stdout[-OUTPUT_CHARS:]}\nstderr:\n{res.stderr[-OUTPUT_CHARS:]}"

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        problems = humaneval()
        if "task_id" in options:
            tid = str(options["task_id"])
            m = re.fullmatch(r"coding/(HumanEval/(\d+)|gen/(\d+))", tid)
            if not m or (m.group(2) is not None and int(m.group(2)) >= len(problems)):
                raise ValueError(f"bad coding task_id {tid!r}; expected 'coding/HumanEval/<0..{len(problems) - 1}>' "
                                 "or 'coding/gen/<n>'")
            t = problems[int(m.group(2))] if m.group(2) is not None else generated(int(m.group(3)))
        else:
            use_he = self.source == "humaneval" or (self.source == "mixed" and rng.random() < 0.5)
            t = problems[int(rng.integers(len(problems)))] if use_he else generated(int(rng.integers(1 << 31)))
        self.coding_task = t
        if self._sandbox is not None and self._sandbox.alive:
            self._sandbox.reset()
        return Task(task_id=f"coding/{t.task_id}", prompt=_prompt(t), data={"entry_point": t.entry_point},
                    resources=Resources(sandbox_backend=self.backend, sandbox_image=self.image, limits=self.limits,
                                        step_timeout_s=self.limits.wall_time_s + 20.0, max_turns=4))

    def _toolbox(self, task: Task) -> Toolbox:
        return Toolbox([self._tool])

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        assert self.coding_task is not None
        if final is None:
            return 0.0, {"passed": False, "reason": "no final answer"}
        t = self.coding_task
        nonce = secrets.token_hex(16)
        sb = self.sandbox()
        try:
            sb.reset()  # files the agent left (say a planted typing.py) must not run inside the tests
        except SandboxDeadError:  # e.g. the agent's code tampered with it: grade in a fresh one
            sb = self.sandbox()
        sb.write_file("solution.py", solution_program(t, final.get("content") or ""))
        spec = json.dumps({"nonce": nonce, "prelude": t.prompt, "test": t.test, "entry_point": t.entry_point,
                           "source": GRADER_SOURCE})
        res = sb.exec(["python3", "-I", "-c", GRADER_SOURCE, "grade"], stdin=spec)
        passed = res.exit_code == 0 and not res.timed_out and res.stdout == f"KPOP-VERDICT {nonce} pass\n"
        return float(passed), {"passed": passed, "exit_code": res.exit_code, "timed_out": res.timed_out,
                               "oom_killed": res.oom_killed, "stderr_tail": res.stderr[-500:]}

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        assert self.coding_task is not None
        return assistant(f"```python\n{self.coding_task.canonical}```")

    def close(self) -> None:
        self._release()
