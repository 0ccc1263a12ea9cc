"""Asynchronous vs synchronous RL on the same workload, with long-tailed environment latency.

    PYTHONPATH=. python bench/async_vs_sync.py --json [--record]

Workload: the quickstart policy and tool-use tasks wrapped in `kpop/latency-v0` (most episodes'
steps take ~fast_s, a fraction p_slow of episodes take ~slow_s per step, lognormal jitter), the
same number of learner steps and the same batch in both modes. Cold-start SFT runs once, on the
plain environment, and both modes resume from its checkpoint, so they start from the same policy
and the comparison times only the RL phase (sum of the RL steps' wall time; Ray/learner start-up
is reported separately as total wall time).

sync  = schedule.mode=sync, max_staleness 0: one batch in flight, the learner waits for the
        slowest episode of every batch, the workers wait for every learner step.
async = schedule.mode=async: generation, environment waits and training overlap, bounded by
        max_staleness.

Prints one JSON line per mode and a final line with `speedup` (sync RL time / async RL time) and
both final rewards (mean training reward over the last 20% of steps, and held-out greedy eval).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench import results as bench_results  # noqa: E402
from kpop.config import load_config  # noqa: E402
from kpop.metrics import read_metrics  # noqa: E402


def overrides(args: argparse.Namespace, base: Path, name: str) -> list[str]:
    return [f"name={name}", f"run_dir={base}", f"seed={args.seed}", f"schedule.batch_size={args.batch}",
            f"rollout.group_size={args.group}", f"rollout.max_concurrent_episodes={args.concurrency}",
            f"learner.sft_steps={args.sft_steps}", f"environments.eval_seeds={list(range(10000, 10000 + args.eval_episodes))}",
            f"learner.checkpoint_every={args.steps}", "logging.tensorboard=false", "logging.progress=false"]


def latency_env(args: argparse.Namespace) -> str:
    inner = load_config(ROOT / "configs/quickstart.yaml").environments.train[0]  # what SFT trained on
    spec = {"id": "environments.latency:kpop/latency-v0", "kwargs": {  # imported where made: not a built-in
        "inner": inner.id, "inner_kwargs": inner.kwargs,
        "fast_s": args.fast_s, "slow_s": args.slow_s, "p_slow": args.p_slow, "sigma": args.sigma}}
    return f"environments.train=[{json.dumps(spec)}]"


def run_mode(args: argparse.Namespace, base: Path, mode: str) -> dict:
    from actors.controller import train

    run_dir = base / mode
    shutil.copytree(base / "sft" / "checkpoints", run_dir / "checkpoints")  # resume from the shared SFT policy
    staleness = 0 if mode == "sync" else args.max_staleness
    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        *overrides(args, base, mode), latency_env(args), f"schedule.mode={mode}",
        f"schedule.max_staleness={staleness}", f"schedule.rl_steps={args.steps}",
        # every batch must be a learner step (a new policy version) in both modes: with dynamic
        # filtering, all-zero-reward groups skip the step and sync mode would never wait for weights
        "algorithm.dynamic_filter=false"])
    summary = train(cfg)
    rows = read_metrics(run_dir, phase="rl")
    return {"mode": mode, "rl_s": round(sum(r["step_wall_s"] for r in rows), 2),
            "total_wall_s": round(summary["wall_s"], 2), "steps": summary["rl_steps"],
            "reward_last": summary["reward_last"], "reward_first": summary["reward_first"],
            "eval_reward_after_rl": summary["eval_reward_after_rl"],
            "eval_reward_before_rl": summary["eval_reward_before_rl"],
            "eval_sampled_after_rl": summary["eval_reward_sampled_after_rl"],
            "eval_sampled_before_rl": summary["eval_reward_sampled_before_rl"],
            "mean_staleness": summary["mean_staleness"], "dropped_stale": summary["trajectories_dropped_stale"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout (last line has `speedup`)")
    ap.add_argument("--record", action="store_true", help="add the result to bench/RESULTS.md (under ## async_vs_sync)")
    ap.add_argument("--steps", type=int, default=16, help="learner steps per mode")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=32, help="episodes in flight per rollout worker")
    ap.add_argument("--max-staleness", type=int, default=4, help="async mode's bound (sync is 0)")
    ap.add_argument("--sft-steps", type=int, default=500, help="cold-start SFT steps, shared (enough for reward > 0)")
    ap.add_argument("--eval-episodes", type=int, default=64, help="held-out seeds (greedy + the quickstart's samples)")
    ap.add_argument("--fast-s", type=float, default=0.5)
    ap.add_argument("--slow-s", type=float, default=8.0)
    ap.add_argument("--p-slow", type=float, default=0.3)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.batch % args.group:
        ap.error(f"--batch ({args.batch}) must be a multiple of --group ({args.group})")
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.load_start = bench_results.load()

    from actors.controller import train

    base = args.out or Path(tempfile.mkdtemp(prefix="kpop-avs-"))
    try:
        # the RL runs' config (the latency env's id and kwargs) is checked before SFT spends minutes
        load_config(ROOT / "configs/quickstart.yaml", [*overrides(args, base, "check"), latency_env(args)])
        # SFT once, on the plain environment: oracle demos through the latency wrapper would only add waiting
        train(load_config(ROOT / "configs/quickstart.yaml", [*overrides(args, base, "sft"), "schedule.rl_steps=0"]))
        results = {mode: run_mode(args, base, mode) for mode in ("sync", "async")}
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)
    for r in results.values():
        print(json.dumps(r) if args.json else f"{r['mode']:>5}: RL {r['rl_s']:.1f} s, total {r['total_wall_s']:.1f} s, "
              f"reward_last {r['reward_last']:.3f}, eval {r['eval_reward_after_rl']:.3f}")
    s, a = results["sync"], results["async"]
    final = {"speedup": round(s["rl_s"] / a["rl_s"], 3), "sync_rl_s": s["rl_s"], "async_rl_s": a["rl_s"],
             "sync_reward_last": s["reward_last"], "async_reward_last": a["reward_last"],
             "sync_eval_reward": s["eval_reward_after_rl"], "async_eval_reward": a["eval_reward_after_rl"],
             "sync_eval_sampled": s["eval_sampled_after_rl"], "async_eval_sampled": a["eval_sampled_after_rl"],
             "eval_reward_before_rl": s["eval_reward_before_rl"], "eval_sampled_before_rl": s["eval_sampled_before_rl"], "steps": args.steps, "batch": args.batch,
             "latency": {"fast_s": args.fast_s, "slow_s": args.slow_s, "p_slow": args.p_slow, "sigma": args.sigma}}
    print(json.dumps(final) if args.json else f"speedup {final['speedup']:.2f}x")
    if args.record:
        record(args, results, final)


def record(args: argparse.Namespace, results: dict, final: dict) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "PYTHONPATH=. python bench/async_vs_sync.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd}` on {when}, {os.cpu_count()} CPUs ({platform.machine()}) shared with "
             f"other jobs ({args.load_start} at the start, {bench_results.load()} at the end); quickstart policy, tool-use wrapped in kpop/latency-v0 (fast {args.fast_s} s, slow "
             f"{args.slow_s} s with p {args.p_slow}, lognormal sigma {args.sigma}), {args.steps} learner steps x "
             f"batch {args.batch} (groups of {args.group}), SFT {args.sft_steps} steps shared.", "",
             "| mode | RL wall s | total wall s | reward_last | eval after RL (greedy / sampled) | mean staleness | dropped stale |",
             "|---|---|---|---|---|---|---|"]
    for r in results.values():
        sampled = "-" if r["eval_sampled_after_rl"] is None else f"{r['eval_sampled_after_rl']:.3f}"
        lines.append(f"| {r['mode']} | {r['rl_s']} | {r['total_wall_s']} | {r['reward_last']:.3f} | "
                     f"{r['eval_reward_after_rl']:.3f} / {sampled} | {r['mean_staleness']:.2f} | {r['dropped_stale']} |")
    before = final["eval_sampled_before_rl"]
    lines.append(f"\nspeedup = {final['speedup']} (goal >= 2.5; AReaL reports 2.77); eval before RL "
                 f"{final['eval_reward_before_rl']:.3f} greedy / {'-' if before is None else f'{before:.3f}'} sampled")
    bench_results.record("async_vs_sync", when, lines)


if __name__ == "__main__":
    main()
