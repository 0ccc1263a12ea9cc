"""Training-inference corrections compared under real mismatch: `none` vs `icepop` vs `kpop`.

    PYTHONPATH=. python bench/corrections.py --json [--record] [--seeds 2] [--rl-steps 30] [--sft-steps 400]

The mismatch is the one users meet, not an injected one: the rollout engine runs the policy in
bf16 (`policy.dtype=bfloat16`) while the learner trains in fp32 (`learner.dtype=float32`), and RL
is asynchronous with samples up to 4 policy versions old (`schedule.max_staleness=4`). Every run
goes through the real CLI, `kpop train CONFIG key=value ... --fresh`, one run directory each
under --out.

Per seed, cold-start SFT runs once (`schedule.rl_steps=0`), short enough that RL still has
something to learn; its held-out eval (greedy + sampled, bf16 rollout) is the "before" of every
variant of that seed, because each variant's RL starts from exactly that policy
(`policy.checkpoint=<sft run>/policy`, `learner.sft_steps=0`; the saved policy holds the bf16
weights the engine evaluated). Each variant then runs the same number of RL steps on the same
seed and ends with the held-out eval ("after").

Per variant, over seeds (mean +- standard error): held-out reward after RL and its change,
greedy and sampled; per run, from runs/<name>/metrics.jsonl: the rate of loss tokens the
correction masked (`mask_rate`), the mean and max |log pi_learner - log pi_rollout| over loss
tokens (`dlogp_mean`, `dlogp_max`: bf16-vs-fp32 plus staleness), and gradient-norm spikes
(steps whose pre-clip `grad_norm` exceeds 3x the run's median, and the max).

Progress goes to stderr while runs go; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("none", "icepop", "kpop")
SPIKE_FACTOR = 3.0  # a step whose grad norm exceeds this multiple of its run's median is a spike
MISMATCH = ["policy.dtype=bfloat16", "learner.dtype=float32", "schedule.mode=async", "schedule.max_staleness=4"]


# -- pure helpers (tested in tests/test_bench_corrections.py) ---------------------------------------

def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); None where undefined."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    if len(vals) == 1:
        return vals[0], None
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals))


def grad_spikes(norms: Sequence[float], factor: float = SPIKE_FACTOR) -> dict[str, float | int | None]:
    """Median, max and the number of steps above `factor` x median of a run's gradient norms
    (non-finite norms count as spikes: they are the worst kind)."""
    finite = [float(n) for n in norms if math.isfinite(n)]
    if not finite:
        return {"median": None, "max": None, "spikes": len(norms)}
    median = statistics.median(finite)
    return {"median": median, "max": max(finite),
            "spikes": sum(1 for n in norms if not math.isfinite(n) or n > factor * median)}


def run_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What one run's RL rows (metrics.jsonl, phase rl) say about the mismatch and its correction.
    Skipped steps (dynamic filtering left no group to learn from) carry no loss statistics."""
    latest: dict[int, dict] = {}
    for r in rows:  # a resumed run may log a step twice: keep the newest
        latest[r["step"]] = r
    steps = [latest[s] for s in sorted(latest)]
    trained = [r for r in steps if not r.get("skipped") and "mask_rate" in r]

    def token_mean(key: str, part: Sequence[dict] = trained) -> float | None:
        """Weighted by loss tokens, as one big batch would be."""
        n = sum(r.get("loss_tokens", 0.0) for r in part)
        if not part:
            return None
        if n <= 0:
            return statistics.fmean(r[key] for r in part)
        return sum(r[key] * r.get("loss_tokens", 0.0) for r in part) / n

    # batches trained on the weights that sampled them: their |dlogp| is bf16 vs fp32 alone
    fresh = [r for r in trained if r.get("staleness_max", 1.0) == 0]

    spikes = grad_spikes([r["grad_norm"] for r in trained if "grad_norm" in r])
    return {
        "steps": len(steps), "trained_steps": len(trained),
        "mask_rate": token_mean("mask_rate"), "dlogp_mean": token_mean("dlogp_mean"),
        "dlogp_max": max((r["dlogp_max"] for r in trained), default=None),
        "grad_norm_median": spikes["median"], "grad_norm_max": spikes["max"], "grad_spikes": spikes["spikes"],
        "dlogp_mean_fresh": token_mean("dlogp_mean", fresh), "fresh_steps": len(fresh),
        "dlogp_max_fresh": max((r["dlogp_max"] for r in fresh), default=None),
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in steps) if steps else None,
        "staleness_max": max((r.get("staleness_max", 0.0) for r in steps), default=None),
        "reward_train_first": steps[0]["reward_mean"] if steps else None,
        "reward_train_last": steps[-1]["reward_mean"] if steps else None,
    }


def aggregate(variant: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One variant over its seeds: mean and standard error of every number; maxima are the
    largest of any seed, spike counts summed."""
    out: dict[str, Any] = {"variant": variant, "seeds": [r["seed"] for r in runs]}
    for key in ("before_greedy", "after_greedy", "before_sampled", "after_sampled",
                "mask_rate", "dlogp_mean", "grad_norm_median", "staleness_mean"):
        out[key], out[f"{key}_se"] = mean_se([r.get(key) for r in runs])
    for kind in ("greedy", "sampled"):
        deltas = [None if r.get(f"after_{kind}") is None or r.get(f"before_{kind}") is None
                  else r[f"after_{kind}"] - r[f"before_{kind}"] for r in runs]
        out[f"delta_{kind}"], out[f"delta_{kind}_se"] = mean_se(deltas)
    out["dlogp_max"] = max((r["dlogp_max"] for r in runs if r["dlogp_max"] is not None), default=None)
    out["grad_spikes"] = sum(r["grad_spikes"] for r in runs)
    out["grad_norm_max"] = max((r["grad_norm_max"] for r in runs if r["grad_norm_max"] is not None), default=None)
    return out


def fmt(value: float | None, se: float | None = None, digits: int = 3) -> str:
    """`0.512 +- 0.031`, `0.512` without a standard error, `-` for nothing."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return text if se is None else f"{text} +- {se:.{digits}f}"


def table(variants: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| correction | greedy before -> after | greedy change | sampled before -> after | sampled change "
             "| mask rate | mean \\|dlogp\\| | max \\|dlogp\\| (any seed) | grad-norm spikes (> 3x median, all seeds) / max norm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        lines.append(
            f"| {v['variant']} | {fmt(v['before_greedy'], v['before_greedy_se'])} -> {fmt(v['after_greedy'], v['after_greedy_se'])} "
            f"| {fmt(v['delta_greedy'], v['delta_greedy_se'])} "
            f"| {fmt(v['before_sampled'], v['before_sampled_se'])} -> {fmt(v['after_sampled'], v['after_sampled_se'])} "
            f"| {fmt(v['delta_sampled'], v['delta_sampled_se'])} | {fmt(v['mask_rate'], digits=4)} "
            f"| {fmt(v['dlogp_mean'], digits=4)} | {fmt(v['dlogp_max'])} | {v['grad_spikes']} / {fmt(v['grad_norm_max'], digits=2)} |")
    return lines


# -- running the CLI -------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[corrections {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kpop_cli() -> list[str]:
    """The `kpop` entry point of this interpreter's environment (what a user runs)."""
    exe = Path(sys.executable).with_name("kpop")
    found = str(exe) if exe.is_file() else shutil.which("kpop")
    if found is None:
        raise SystemExit("bench/corrections.py: no `kpop` command next to this Python or on PATH")
    return [found]


def train(config: Path, out: Path, name: str, overrides: list[str], rl_steps: int) -> dict[str, Any]:
    """`kpop train config name=... run_dir=out overrides... --fresh`, its output to out/<name>.log;
    a progress line every ~30 s from the run's metrics; returns its summary.json."""
    cmd = [*kpop_cli(), "train", str(config), f"name={name}", f"run_dir={out}", *overrides,
           "logging.tensorboard=false", "logging.progress=false", "--fresh"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = out / f"{name}.log"
    log(f"{name}: start ({log_path})")
    t0 = time.monotonic()
    with log_path.open("w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(2.0)
            if time.monotonic() - last >= 30.0:
                last = time.monotonic()
                log(f"{name}: {progress(out / name, rl_steps, log_path)} ({time.monotonic() - t0:.0f} s)")
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"bench/corrections.py: `{' '.join(cmd)}` exited {proc.returncode}; last lines of "
                         f"{log_path}:\n{tail}")
    summary = json.loads((out / name / "summary.json").read_text())
    log(f"{name}: done in {time.monotonic() - t0:.0f} s")
    return summary


def progress(run_dir: Path, rl_steps: int, log_path: Path) -> str:
    """One line on where a run is, from its metrics (RL, eval) and its log (start-up, SFT)."""
    from kpop.metrics import read_metrics

    try:
        rows = read_metrics(run_dir)
    except (OSError, ValueError):  # a line being written
        return "running"
    rl = [r for r in rows if r.get("phase") == "rl"]
    if rl:
        r = rl[-1]
        head = f"RL step {r['step']}/{rl_steps} reward {r.get('reward_mean', float('nan')):.3f}"
        if r.get("skipped") or "mask_rate" not in r:
            return f"{head} (no group with varied rewards: no update)"
        return f"{head} mask {r['mask_rate']:.4f} dlogp {r['dlogp_mean']:.4f} grad {r['grad_norm']:.2f}"
    if any(r.get("phase") == "eval" for r in rows):
        return "eval done, RL starting" if rl_steps else "eval done, saving the policy"
    sft = [r for r in rows if r.get("phase") == "sft"]
    if sft:
        return f"SFT done ({len(sft)} steps, loss {sft[-1]['sft_loss']:.3f}), eval"
    text = log_path.read_text(errors="replace")
    if "cold-start SFT" in text:
        return "SFT running (its steps are logged when it ends)"
    return "starting (Ray, learner, rollout workers)"


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    from kpop.metrics import read_metrics

    sft_name = f"sft-s{seed}"
    # SFT with the bf16 engine: its held-out eval then measures exactly the weights each variant
    # starts from (the learner trains fp32 either way)
    sft = train(args.config, args.out, sft_name,
                [f"seed={seed}", f"learner.sft_steps={args.sft_steps}", "schedule.rl_steps=0", *MISMATCH],
                rl_steps=0)
    log(f"{sft_name}: held-out reward {sft['eval_reward_before_rl']:.3f} greedy, "
        f"{fmt(sft['eval_reward_sampled_before_rl'])} sampled")
    runs = []
    for variant in args.variants:
        name = f"{variant}-s{seed}"
        summary = train(args.config, args.out, name, [
            f"seed={seed}", f"policy.checkpoint={args.out / sft_name / 'policy'}", "learner.sft_steps=0",
            f"schedule.rl_steps={args.rl_steps}", f"algorithm.correction={variant}",
            "schedule.eval_before_rl=false", *MISMATCH], rl_steps=args.rl_steps)
        stats = run_stats(read_metrics(args.out / name, phase="rl"))
        run = {"variant": variant, "seed": seed,
               "before_greedy": sft["eval_reward_before_rl"], "after_greedy": summary["eval_reward_after_rl"],
               "before_sampled": sft["eval_reward_sampled_before_rl"],
               "after_sampled": summary["eval_reward_sampled_after_rl"], "wall_s": round(summary["wall_s"], 1),
               **stats}
        log(f"{name}: greedy {fmt(run['before_greedy'])} -> {fmt(run['after_greedy'])}, sampled "
            f"{fmt(run['before_sampled'])} -> {fmt(run['after_sampled'])}, mask {fmt(run['mask_rate'], digits=4)}, "
            f"dlogp {fmt(run['dlogp_mean'], digits=4)}, spikes {run['grad_spikes']}")
        runs.append(run)
        with (args.out / "runs.jsonl").open("a") as fh:  # what finished survives a later failure
            fh.write(json.dumps(run) + "\n")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1, each with its own SFT")
    ap.add_argument("--rl-steps", type=int, default=30, help="RL steps per variant and seed")
    # the quickstart's 800 SFT steps already solve its task (nothing left for RL); after ~500 the
    # policy earns ~0.8 held-out and has copied numbers from the prompt on some seeds, ~300 on none
    ap.add_argument("--sft-steps", type=int, default=400, help="cold-start SFT steps, once per seed")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    ap.add_argument("--record", action="store_true", help="add the result to bench/RESULTS.md (## corrections)")
    args = ap.parse_args()
    if args.seeds < 1 or args.rl_steps < 1 or args.sft_steps < 1:
        ap.error("--seeds, --rl-steps and --sft-steps must each be >= 1")
    args.config = args.config.resolve()
    keep = args.out is not None
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="kpop-corr-"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        runs = [run for seed in range(args.seeds) for run in run_seed(args, seed)]
    finally:
        if not keep:
            shutil.rmtree(args.out, ignore_errors=True)
    variants = [aggregate(v, [r for r in runs if r["variant"] == v]) for v in args.variants]
    result = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
              "seeds": args.seeds, "rl_steps": args.rl_steps, "sft_steps": args.sft_steps, "mismatch": MISMATCH,
              "wall_s": round(time.monotonic() - t0, 1), "variants": variants, "runs": runs}
    if not args.json:
        print("\n".join(table(variants)))
    if args.record:
        record(args, result)
    print(json.dumps(result))


def record(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from bench import results as bench_results

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "PYTHONPATH=. python bench/corrections.py " + " ".join(sys.argv[1:])
    try:
        load = " (load average %.1f at the end)" % os.getloadavg()[0]
    except OSError:
        load = ""
    lines = [f"`{cmd}` on {when}, {os.cpu_count()} CPUs ({platform.machine()}) shared with other jobs{load}; "
             f"{result['wall_s'] / 60:.0f} min. Config {result['config']} with {' '.join(result['mismatch'])}; "
             f"SFT {args.sft_steps} steps once per seed, then {args.rl_steps} RL steps per correction from that "
             f"policy; seeds 0..{args.seeds - 1}; mean +- standard error over seeds (before is shared per seed).",
             "", *table(result["variants"]), "", "Per run:", "",
             "| run | greedy | sampled | mask rate | mean \\|dlogp\\| | max \\|dlogp\\| | fresh batches: mean / max \\|dlogp\\| "
             "| grad norm median / max | spikes | staleness mean / max | trained steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['variant']} s{r['seed']} | {fmt(r['before_greedy'])} -> {fmt(r['after_greedy'])} "
                     f"| {fmt(r['before_sampled'])} -> {fmt(r['after_sampled'])} | {fmt(r['mask_rate'], digits=4)} "
                     f"| {fmt(r['dlogp_mean'], digits=4)} | {fmt(r['dlogp_max'])} "
                     f"| {fmt(r['dlogp_mean_fresh'], digits=4)} / {fmt(r['dlogp_max_fresh'])} ({r['fresh_steps']} step{'' if r['fresh_steps'] == 1 else 's'}) "
                     f"| {fmt(r['grad_norm_median'], digits=2)} / {fmt(r['grad_norm_max'], digits=2)} | {r['grad_spikes']} "
                     f"| {fmt(r['staleness_mean'], digits=2)} / {fmt(r['staleness_max'], digits=0)} | {r['trained_steps']}/{r['steps']} |")
    bench_results.record("corrections", when, lines)


if __name__ == "__main__":
    main()
