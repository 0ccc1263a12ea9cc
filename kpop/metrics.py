"""Run metrics: one JSON line per step in `metrics.jsonl`, mirrored to TensorBoard.

JSONL is the source of truth (the viewer and `summary.json` read it back); TensorBoard is
for people watching a run. Appending keeps a resumed run's history in one file.

Each metric is written once, by the level that computes it: a level adding its own metrics to a
row it received uses `add_once`, so it cannot silently replace a lower level's value.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("kpop.train")


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], phase: str = "rl") -> None:
        row = {"phase": phase, "step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(row, default=float) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def add_once(row: dict[str, Any], **new: Any) -> dict[str, Any]:
    """`row` with `new` added; a key already in `row` is an error naming it."""
    clash = sorted(set(row) & set(new))
    if clash:
        raise ValueError(f"metrics {clash} are already in the row: each metric has one writer")
    return {**row, **new}


def read_metrics(run_dir: Path, phase: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if phase is None or r.get("phase") == phase]


def summarize_rl(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The RL phase of a run in four numbers, from its `rl` rows (first and last fifth of the
    steps for the reward). `reward_*` is the environments' reward, comparable with eval rewards
    (the learner's `reward_mean` may include a length reward)."""
    latest: dict[int, dict] = {}
    for r in rows:  # a resumed run may have logged a step twice: keep the newest
        latest[r["step"]] = r
    rows = [latest[s] for s in sorted(latest)]
    k = max(1, len(rows) // 5)

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if key in r]
        return statistics.fmean(vals) if vals else None

    return {
        "reward_first": mean("task_reward_mean", rows[:k]),
        "reward_last": mean("task_reward_mean", rows[-k:]),
        "mean_staleness": mean("staleness_mean", rows),
        "kpop_mask_rate": mean("mask_rate", rows),
        "cut_rate": mean("episodes_cut_rate", rows),  # episodes the runner cut (scored 0, ungraded)
    }


class Progress:
    """Progress of one long phase (SFT, eval, RL): a rich bar on a terminal; elsewhere (CI, nohup,
    a log file) a plain log line at most every `every_s` seconds and every 5% of the phase,
    whichever is rarer, and always one at the end.

        with Progress("sft", total=800, bar=cfg.logging.progress) as p:
            p.update(120, "loss 1.234")    # -> "sft 120/800 loss 1.234 (15%, 0:45 elapsed, ~4:15 left)"

    `bar=False` never draws a bar (plain lines only). `clock` is injectable so tests need not sleep.
    """

    def __init__(self, name: str, total: int, bar: bool = True, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.total, self.every_s, self.clock = name, total, every_s, clock
        # a bar only where someone watches it: both streams on a terminal (logs go to stderr)
        self.use_bar = bar and sys.stdout.isatty() and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self.t0 = self._last_t = clock()
        self._last_done = 0

    def __enter__(self) -> "Progress":
        if self.use_bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, info="")
        return self

    def update(self, done: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
            return
        now = self.clock()
        final = done >= self.total
        due = (now - self._last_t >= self.every_s and done - self._last_done >= 0.05 * self.total)
        if not (final or due) or done == self._last_done:
            return
        self._last_t, self._last_done = now, done
        elapsed = now - self.t0
        left = elapsed / done * (self.total - done) if done else None
        log.info("%s %d/%d%s (%d%%, %s elapsed%s)", self.name, done, self.total, f" {info}" if info else "",
                 100 * done // max(self.total, 1), _clock_time(elapsed),
                 "" if left is None or final else f", ~{_clock_time(left)} left")

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _clock_time(seconds: float) -> str:
    """1:05 for 65 s; 1:01:05 past an hour."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rl_info(m: dict[str, float]) -> str:
    """The RL step's numbers a person watches, for `Progress.update`."""
    return (f"reward {m['task_reward_mean']:.3f}  staleness {m.get('staleness_mean', 0.0):.2f}  "
            f"tok/s {m['wall_tokens_per_s']:.0f}  kpop mask {m.get('mask_rate', 0.0):.3f}")
