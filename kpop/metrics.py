"""Run metrics: one JSON line per step in `metrics.jsonl`, mirrored to TensorBoard.

JSONL is the source of truth (the viewer and `summary.json` read it back); TensorBoard is
for people watching a run. Appending keeps a resumed run's history in one file.

Each metric is written once, by the level that computes it: a level adding its own metrics to a
row it received uses `add_once`, so it cannot silently replace a lower level's value.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


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
