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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class RLProgress:
    """Rich progress line for the RL phase (plain log lines when disabled)."""

    enabled: bool
    total: int
    bar: Any = field(default=None, init=False)
    task: Any = field(default=None, init=False)

    def __enter__(self) -> "RLProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}"))
            self.bar.__enter__()
            self.task = self.bar.add_task("rl", total=self.total, info="waiting for the first batch")
        return self

    def update(self, step: int, m: dict[str, float]) -> None:
        info = (f"reward {m['task_reward_mean']:.3f}  staleness {m.get('staleness_mean', 0.0):.2f}  "
                f"tok/s {m['wall_tokens_per_s']:.0f}  kpop mask {m.get('mask_rate', 0.0):.3f}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info("step %d/%d  %s", step, self.total, info)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
