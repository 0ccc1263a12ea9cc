"""Held-out gain of finished quickstart runs (issue #19's goal: +0.15 greedy and sampled on every seed).

    PYTHONPATH=. python bench/quickstart_seeds.py runs/quickstart-s0 runs/quickstart-s1 runs/quickstart-s2

Reads each run's summary.json and the two eval rows of its metrics.jsonl. The gain's standard error
is paired over held-out tasks (the same tasks are played before and after RL), so the task-to-task
spread of difficulty cancels out of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kpop.config import load_config
from kpop.metrics import read_metrics

GOAL = 0.15


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of after - before per task, and its standard error."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need the same >= 2 held-out tasks before and after, got {len(before)} and {len(after)}")
    diffs = [a - b for a, b in zip(after, before)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def run_gains(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    evals = read_metrics(run, phase="eval")
    if len(evals) < 2 or "eval_task_rewards" not in evals[0]:
        raise ValueError(f"{run}: needs the before- and after-RL eval rows with per-task rewards "
                         "(runs from before the eval logged them cannot be paired)")
    before, after = evals[0], evals[-1]
    out = {"run": str(run), "seed": load_config(run / "config.yaml").seed, "rl_steps": summary["rl_steps"],
           "tasks": len(before["eval_task_rewards"]), "wall_s": round(summary["wall_s"], 1)}
    for kind in ("", "_sampled"):
        gain, se = paired_gain(before[f"eval_task_rewards{kind}"], after[f"eval_task_rewards{kind}"])
        name = kind.strip("_") or "greedy"
        out[name] = {"before": before[f"eval_reward{kind}"], "after": after[f"eval_reward{kind}"],
                     "gain": gain, "gain_se": se, "goal_met": gain >= GOAL}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = [run_gains(r) for r in args.runs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| seed | greedy before -> after (gain +- SE) | sampled before -> after (gain +- SE) | wall |")
        print("|---|---|---|---|")
        for r in rows:
            g, s = r["greedy"], r["sampled"]
            print(f"| {r['seed']} | {g['before']:.3f} -> {g['after']:.3f} ({g['gain']:+.3f} +- {g['gain_se']:.3f}) "
                  f"| {s['before']:.3f} -> {s['after']:.3f} ({s['gain']:+.3f} +- {s['gain_se']:.3f}) "
                  f"| {r['wall_s']:.0f} s |")
    met = all(r["greedy"]["goal_met"] and r["sampled"]["goal_met"] for r in rows)
    print(f"goal (+{GOAL} greedy and sampled on every run): {'met' if met else 'not met'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
