"""Tool use: answer a question by calling typed tools (calculator, unit conversion, SQL).

Difficulty (the `difficulty` kwarg) exists so that a tiny model trained from scratch can learn:
  0: one arithmetic operation, one calculator call, a number as the answer ("add 17 and 25");
     only the calculator is offered and there is no system prompt, so prompts stay short;
  1: a two-operation expression, or a unit conversion (calculator + convert_units);
  2: a lookup in a SQLite database of real facts (planets, chemical elements), sometimes
     followed by arithmetic (all three tools).

`split="train"` / `"eval"` draws only from a fixed 90% / 10% of prompts (by prompt hash), so
held-out reward really is measured on prompts never trained on.

Reward (partial credit, so a weak policy still gets signal):
  0.1 * call   -- some tool call parsed and ran: format credit. Without it a well-formed call with
                  wrong numbers scores like a malformed one, and RL's push-down on wrong episodes
                  also pushes down the JSON that follows the mistake, until calls stop parsing.
  0.4 * tool   -- fraction of the task's required tool results that some successful call produced
  0.5 * answer -- the last number in the final message equals the answer (relative tol 1e-4)

The SQL tool runs model-chosen queries in the rollout worker's process, so it has least authority
(see `ReadOnlySql`): its own in-memory copy of the facts, read-only, an authoriser that allows only
reading the facts and an allow-list of pure functions (no ATTACH, PRAGMA, VACUUM, writes or
load_extension), bounded value sizes, and a time limit enforced by interrupting the query.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import random
import sqlite3
import threading
import time
from typing import Any, Literal, Sequence

import numpy as np

from environments.core import ChatEnv, Message, Resources, Task, assistant, count_assistant_turns
from environments.grading import format_number, last_number, numbers_in, same_number
from environments.tools import Toolbox, ToolError, make_tool

# ---- the database: real facts --------------------------------------------------------------
PLANETS = [  # name, moons (IAU count, 2023), mean diameter km, orbital period days
    ("Mercury", 0, 4879, 88), ("Venus", 0, 12104, 225), ("Earth", 1, 12756, 365),
    ("Mars", 2, 6792, 687), ("Jupiter", 95, 142984, 4331), ("Saturn", 146, 120536, 10747),
    ("Uranus", 28, 51118, 30589), ("Neptune", 16, 49528, 59800),
]
ELEMENTS = [  # symbol, name, atomic number, standard atomic weight (rounded)
    ("H", "Hydrogen", 1, 1.008), ("He", "Helium", 2, 4.0026), ("Li", "Lithium", 3, 6.94),
    ("Be", "Beryllium", 4, 9.0122), ("B", "Boron", 5, 10.81), ("C", "Carbon", 6, 12.011),
    ("N", "Nitrogen", 7, 14.007), ("O", "Oxygen", 8, 15.999), ("F", "Fluorine", 9, 18.998),
    ("Ne", "Neon", 10, 20.18), ("Na", "Sodium", 11, 22.99), ("Mg", "Magnesium", 12, 24.305),
    ("Al", "Aluminium", 13, 26.982), ("Si", "Silicon", 14, 28.085), ("P", "Phosphorus", 15, 30.974),
    ("S", "Sulfur", 16, 32.06), ("Cl", "Chlorine", 17, 35.45), ("Ar", "Argon", 18, 39.95),
    ("K", "Potassium", 19, 39.098), ("Ca", "Calcium", 20, 40.078),
]
SCHEMA = ("planets(name TEXT, moons INTEGER, diameter_km INTEGER, orbit_days INTEGER); "
          "elements(symbol TEXT, name TEXT, atomic_number INTEGER, atomic_weight REAL)")


def open_database() -> sqlite3.Connection:
    """A fresh, private, in-memory database of the facts (writable: only code of this module uses it)."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("CREATE TABLE planets(name TEXT PRIMARY KEY, moons INTEGER, diameter_km INTEGER, orbit_days INTEGER)")
    db.execute("CREATE TABLE elements(symbol TEXT PRIMARY KEY, name TEXT, atomic_number INTEGER, atomic_weight REAL)")
    db.executemany("INSERT INTO planets VALUES (?,?,?,?)", PLANETS)
    db.executemany("INSERT INTO elements VALUES (?,?,?,?)", ELEMENTS)
    db.commit()
    return db


SQL_TIME_LIMIT_S = 2.0  # a query over these 28 rows needs microseconds; anything longer is a loop
SQL_MAX_VALUE_BYTES = 1 << 20  # largest string or blob a query may build (SQLITE_LIMIT_LENGTH)
SQL_MAX_ROWS = 20
# Pure, deterministic, bounded functions. Everything else is refused: load_extension (native
# code), zeroblob/randomblob (memory), fts3_tokenizer (pointers), sqlite_* (build details) ...
SQL_FUNCTIONS = frozenset("""
    abs avg count group_concat max min sum total round length lower upper substr substring trim ltrim
    rtrim replace instr coalesce ifnull nullif iif typeof printf format like glob hex quote unicode char
""".split())
_SQL_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE}


def _authorize(action: int, arg1: str | None, arg2: str | None, db_name: str | None, _trigger: str | None) -> int:
    """sqlite3 authoriser of the agent's connection: an allow-list, so a statement kind SQLite adds
    later is refused too. ATTACH/DETACH, PRAGMA, VACUUM (INTO), writes and DDL all fall outside it."""
    if action in _SQL_ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ and db_name in ("main", None):  # None: a CTE's own rows
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in SQL_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class ReadOnlySql:
    """The agent's SQL: one query at a time on a private read-only connection, interruptible.

    Layers, each enough against a different attack: the connection holds only an in-memory copy of
    the facts (no host file behind it); `PRAGMA query_only` and the authoriser refuse every write;
    the authoriser refuses ATTACH (host files), VACUUM INTO (writes a host file), PRAGMA and
    functions outside `SQL_FUNCTIONS`; `SQLITE_LIMIT_ATTACHED` = 0 refuses ATTACH again; value
    sizes are capped; a progress handler interrupts a query after `SQL_TIME_LIMIT_S` or as soon as
    `close()` is called, so an endless recursive CTE ends in a tool error and never pins a core or
    blocks `close()`.
    """

    def __init__(self, time_limit_s: float = SQL_TIME_LIMIT_S) -> None:
        self.time_limit_s = time_limit_s
        self.db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        source = open_database()
        source.backup(self.db)
        source.close()
        self.db.execute("PRAGMA query_only = ON")
        self.db.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQL_MAX_VALUE_BYTES)
        self.db.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 10_000)
        self.db.set_authorizer(_authorize)
        self.db.set_progress_handler(self._should_stop, 1000)  # every 1000 VM instructions
        self._lock = threading.Lock()  # one query at a time: the deadline belongs to it
        self._deadline = math.inf
        self._closed = False

    def _should_stop(self) -> int:
        return int(self._closed or time.monotonic() > self._deadline)

    def sql_query(self, query: str) -> str:
        """Run one read-only SQL SELECT. Tables: planets(name, moons, diameter_km, orbit_days),
        elements(symbol, name, atomic_number, atomic_weight).

        Args:
            query: the SQL statement.
        """
        with self._lock:
            if self._closed:
                raise ToolError("the database is closed (the episode has ended)")
            self._deadline = time.monotonic() + self.time_limit_s
            try:
                rows = self.db.execute(query).fetchmany(SQL_MAX_ROWS)
            except sqlite3.OperationalError as exc:
                if str(exc) == "interrupted" and self._closed:
                    raise ToolError("SQL error: the episode ended while the query ran; it was stopped") from None
                if str(exc) == "interrupted":
                    raise ToolError(f"SQL error: the query exceeded the time limit of {self.time_limit_s:g} s "
                                    "and was stopped") from None
                raise ToolError(f"SQL error: {exc}") from None
            except (sqlite3.Error, sqlite3.Warning) as exc:
                raise ToolError(f"SQL error: {exc}") from None
            except (OverflowError, UnicodeError, MemoryError) as exc:  # values sqlite3 cannot convert
                raise ToolError(f"SQL error: {type(exc).__name__}: {exc}") from None
            finally:
                self._deadline = math.inf
        return json.dumps([[_sql_value(v) for v in row] for row in rows])

    def close(self) -> None:
        """Stop a running query (it ends with a tool error), then close: waits only for the interrupted
        query to unwind, never for a query to finish."""
        self._closed = True
        self.db.interrupt()
        with self._lock:  # the running query, if any, is being interrupted: this wait is short
            self.db.close()


def _sql_value(value: Any) -> Any:
    if isinstance(value, bytes):  # a blob: SQLite's own literal syntax, as text
        return f"x'{value.hex()}'"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---- tools ------------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ToolError("exponent too large")
        try:
            return _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
    raise ToolError(f"unsupported expression element: {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "17 + 25".
    """
    if len(expression) > 200:
        raise ToolError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a NUL byte in the source
        raise ToolError(f"cannot parse {expression!r}") from None
    try:
        value = _eval(tree.body)
    except OverflowError:
        raise ToolError("the result is too large") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    return _finite(value)


def _finite(value: Any) -> str:
    """A tool's numeric result as text; a complex or infinite value is the caller's mistake."""
    if isinstance(value, complex):
        raise ToolError(f"the result {value} is not a real number")
    if not math.isfinite(value):
        raise ToolError(f"the result is not a finite number ({value})")
    return format_number(value)


_UNITS: dict[str, tuple[str, float]] = {  # unit -> (dimension, factor to the SI base unit)
    "mm": ("length", 1e-3), "cm": ("length", 1e-2), "m": ("length", 1.0), "km": ("length", 1e3),
    "in": ("length", 0.0254), "ft": ("length", 0.3048), "mi": ("length", 1609.344),
    "g": ("mass", 1e-3), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "ml": ("volume", 1e-3), "l": ("volume", 1.0),
}
_TEMPS = ("C", "F", "K")


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, mass, time, volume or temperature.

    Args:
        value: the quantity to convert.
        from_unit: one of mm cm m km in ft mi g kg lb oz s min h day ml l C F K.
        to_unit: the unit to convert to (same dimension).
    """
    if from_unit in _TEMPS and to_unit in _TEMPS:
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        out = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
        return _finite(round(out, 4))
    if from_unit not in _UNITS or to_unit not in _UNITS:
        bad = from_unit if from_unit not in _UNITS and from_unit not in _TEMPS else to_unit
        raise ToolError(f"unknown or mismatched unit {bad!r}")
    (d1, f1), (d2, f2) = _UNITS[from_unit], _UNITS[to_unit]
    if d1 != d2:
        raise ToolError(f"cannot convert {d1} ({from_unit}) to {d2} ({to_unit})")
    return _finite(round(value * f1 / f2, 4))


# ---- tasks ------------------------------------------------------------------------------------
def _task_level0(r: random.Random) -> tuple[str, str, list[tuple[str, float]], float]:
    op = r.choice(["add", "sub", "mul"])
    if op == "add":
        a, b = r.randint(0, 99), r.randint(0, 99)
        return f"add {a} and {b}", f"{a}+{b}", [("calculator", a + b)], a + b
    if op == "sub":
        a, b = r.randint(0, 99), r.randint(0, 99)
        a, b = max(a, b), min(a, b)
        return f"subtract {b} from {a}", f"{a}-{b}", [("calculator", a - b)], a - b
    a, b = r.randint(2, 12), r.randint(0, 99)
    return f"multiply {a} by {b}", f"{a}*{b}", [("calculator", a * b)], a * b


def _task_level1(r: random.Random) -> tuple[str, Any, list[tuple[str, float]], float]:
    if r.random() < 0.5:
        a, b, c = r.randint(1, 50), r.randint(1, 50), r.randint(2, 9)
        expr = r.choice([f"({a} + {b}) * {c}", f"{a} * {c} - {b}", f"({a} - {b}) * {c}"])
        value = float(calculator(expr))
        return f"compute {expr}", expr, [("calculator", value)], value
    pairs = [("km", "m"), ("m", "cm"), ("mi", "km"), ("ft", "m"), ("kg", "g"), ("lb", "kg"),
             ("h", "min"), ("day", "h"), ("l", "ml"), ("C", "F"), ("F", "C")]
    src, dst = r.choice(pairs)
    v = r.randint(1, 100)
    value = float(convert_units(float(v), src, dst))
    return f"convert {v} {src} to {dst}", (float(v), src, dst), [("convert_units", value)], value


def _task_level2(r: random.Random) -> tuple[str, Any, list[tuple[str, float]], float]:
    kind = r.choice(["moons", "diameter", "atomic_number", "sum_moons"])
    if kind == "sum_moons":
        (p1, m1, *_), (p2, m2, *_) = r.sample(PLANETS, 2)
        q1 = f"SELECT moons FROM planets WHERE name = '{p1}'"
        q2 = f"SELECT moons FROM planets WHERE name = '{p2}'"
        prompt = f"How many moons do {p1} and {p2} have together?"
        required = [("sql_query", m1), ("sql_query", m2), ("calculator", m1 + m2)]
        return prompt, (q1, q2, f"{m1} + {m2}"), required, m1 + m2
    if kind == "atomic_number":
        sym, name, z, _ = r.choice(ELEMENTS)
        q = f"SELECT atomic_number FROM elements WHERE name = '{name}'"
        return f"What is the atomic number of {name.lower()}?", (q,), [("sql_query", z)], z
    name, moons, diam, _ = r.choice(PLANETS)
    if kind == "moons":
        q = f"SELECT moons FROM planets WHERE name = '{name}'"
        return f"How many moons does {name} have?", (q,), [("sql_query", moons)], moons
    q = f"SELECT diameter_km FROM planets WHERE name = '{name}'"
    return f"What is the diameter of {name} in km?", (q,), [("sql_query", diam)], diam


_LEVELS = (_task_level0, _task_level1, _task_level2)


def split_of(prompt: str) -> Literal["train", "eval"]:
    """A fixed tenth of all prompts is held out for evaluation, decided by the prompt's hash."""
    return "eval" if int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"
_SYSTEM = "Use the tools. Reply with just the answer."


def _uses_tools(task_id: str, share: float) -> bool:
    """Whether the oracle calls the tools on this task: a fixed `share` of tasks, by task-id hash
    (salted, so the choice is independent of the train/eval split)."""
    h = int(hashlib.sha256(f"oracle-tools:{task_id}".encode()).hexdigest()[:8], 16)
    return h / 0x1_0000_0000 < share


class ToolUseEnv(ChatEnv):
    """`oracle_tool_share` < 1 makes the oracle a mixed-quality demonstrator: on that share of tasks
    it calls the tools, on the rest it answers directly from "mental arithmetic" (the correct number,
    reward 0.5) -- a skill a small policy cannot imitate, so demonstrations from it leave RL a lesson
    to learn (always call the tool). Below 1 the oracle no longer earns reward 1 on every task."""

    def __init__(self, difficulty: int = 0, split: Literal["all", "train", "eval"] = "all",
                 system_prompt: bool | None = None, max_turns: int | None = None, render_mode: str | None = None,
                 show_tools: bool = True, oracle_tool_share: float = 1.0):
        super().__init__(max_turns=max_turns, render_mode=render_mode, show_tools=show_tools)
        if difficulty not in range(len(_LEVELS)):
            raise ValueError(f"difficulty must be 0, 1 or 2, got {difficulty!r}")
        if split not in ("all", "train", "eval"):
            raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
        if isinstance(oracle_tool_share, bool) or not isinstance(oracle_tool_share, (int, float)) \
                or not 0.0 <= oracle_tool_share <= 1.0:
            raise ValueError(f"oracle_tool_share must be a number in [0, 1], got {oracle_tool_share!r}")
        self.oracle_tool_share = float(oracle_tool_share)
        self.split = split
        self.difficulty = difficulty
        self.system_prompt = system_prompt  # None: only above level 0, where prompts must stay tiny
        self._sql = ReadOnlySql()
        # Tool objects are built once: their pydantic models are the costly part.
        self._all_tools = [make_tool(calculator), make_tool(convert_units), make_tool(self._sql.sql_query)]

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if "task_id" in options:
            try:
                _, level_s, n_s = str(options["task_id"]).split("/")
                level, n = int(level_s.lstrip("d")), int(n_s)
            except ValueError:
                raise ValueError(f"bad tooluse task_id {options['task_id']!r}; "
                                 "expected 'tooluse/d<level>/<n>'") from None
            if level not in range(len(_LEVELS)):
                raise ValueError(f"task_id {options['task_id']!r} names difficulty {level}, which does not exist")
            prompt, gold_args, required, answer = _LEVELS[level](random.Random(n))
        else:
            level = self.difficulty
            while True:  # rejection keeps train and eval prompts disjoint, whatever the seeds
                n = int(rng.integers(1 << 31))
                prompt, gold_args, required, answer = _LEVELS[level](random.Random(n))
                if self.split in ("all", split_of(prompt)):
                    break
        use_system = level > 0 if self.system_prompt is None else self.system_prompt
        return Task(task_id=f"tooluse/d{level}/{n}", prompt=prompt, system=_SYSTEM if use_system else None,
                    data={"level": level, "gold": gold_args, "required": required, "answer": answer},
                    resources=Resources(step_timeout_s=10.0, max_turns=4 if level < 2 else 6))

    def _toolbox(self, task: Task) -> Toolbox:
        return Toolbox(self._all_tools[: task.data["level"] + 1])

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        assert self.task is not None
        results = _successful_results(self.transcript)
        required = self.task.data["required"]
        remaining = list(results)
        hit = 0
        for name, value in required:  # each required result must come from a distinct call
            for i, (n, content) in enumerate(remaining):
                if n == name and any(same_number(x, value) for x in numbers_in(content)):
                    hit += 1
                    del remaining[i]
                    break
        tool_score = hit / len(required)
        answer = self.task.data["answer"]
        got = last_number(final.get("content") or "") if final else None
        answer_score = float(same_number(got, answer))
        call_score = float(bool(results))
        return 0.1 * call_score + 0.4 * tool_score + 0.5 * answer_score, {
            "call": call_score, "tool": tool_score, "answer": answer_score, "expected": format_number(answer),
            "got": None if got is None else format_number(got), "tool_calls": len(results)}

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        assert self.task is not None
        gold, level = self.task.data["gold"], self.task.data["level"]
        step = count_assistant_turns(messages)
        if not _uses_tools(self.task.task_id, self.oracle_tool_share):
            return assistant(format_number(self.task.data["answer"]))
        if level == 0 or (level == 1 and isinstance(gold, str)):
            plan = [("calculator", {"expression": gold})]
        elif level == 1:
            plan = [("convert_units", {"value": gold[0], "from_unit": gold[1], "to_unit": gold[2]})]
        else:
            plan = [("sql_query", {"query": q}) for q in gold[: 2 if len(gold) == 3 else 1]]
            if len(gold) == 3:
                plan.append(("calculator", {"expression": gold[2]}))
        if step < len(plan):
            return assistant(None, plan[step])
        return assistant(format_number(self.task.data["answer"]))

    def close(self) -> None:
        self._sql.close()


def _successful_results(transcript: Sequence[Message]) -> list[tuple[str, str]]:
    return [(m.get("name", ""), m.get("content") or "") for m in transcript
            if m.get("role") == "tool" and not (m.get("content") or "").startswith("error:")]
