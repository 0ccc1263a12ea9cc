"""Sandbox latency and throughput, both backends (a benchmark, not a test).

    python bench/sandbox.py [--json] [--backends bwrap,docker] [-n 50] [--record]

Measures, for `python3 -c pass`: create+exec+close (cold), exec in a warm pooled sandbox,
and acquire+exec+release throughput at concurrency 1/4/16 (a pool of that size, one thread
per slot). Goals (issue 6): warm exec p50 <= 20 ms (bwrap), <= 100 ms (docker). The same command
(the system python3) run by a plain `subprocess.run` on the host is measured in the same run, so each warm exec also has a
ratio to it (what the sandbox adds, comparable across runs on a shared machine). With --json
every measurement is one JSON line; the last line has bwrap_warm_p50_ms and docker_warm_p50_ms.
--record adds a dated table under "## sandbox" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from sandboxes import SandboxPool, create_sandbox  # noqa: E402

CMD = ["python3", "-c", "pass"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(name: str, backend: str, ms: list[float]) -> dict:
    return {"bench": name, "backend": backend, "n": len(ms), "p50_ms": round(pct(ms, 0.5), 2),
            "p99_ms": round(pct(ms, 0.99), 2), "mean_ms": round(statistics.fmean(ms), 2)}


def host(n: int) -> dict:
    # the system python3, as the sandboxes run it: the PATH's python3 may be a pyenv shim (a shell
    # script) or a virtualenv's, whose site-packages start-up would make the baseline slower
    cmd = [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3", *CMD[1:]]
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        ms.append((time.perf_counter() - t) * 1e3)
    return summary("host_subprocess_run", "host", ms)


def cold(backend: str, n: int) -> dict:
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        with create_sandbox(backend) as sb:
            assert sb.exec(CMD).exit_code == 0
        ms.append((time.perf_counter() - t) * 1e3)
    return summary("create_exec_close", backend, ms)


def warm(backend: str, n: int) -> tuple[dict, dict]:
    exec_ms, cycle_ms = [], []
    with SandboxPool(backend, size=1) as pool:
        for _ in range(n):
            t0 = time.perf_counter()
            with pool.acquire() as sb:
                t1 = time.perf_counter()
                assert sb.exec(CMD).exit_code == 0
                exec_ms.append((time.perf_counter() - t1) * 1e3)
            cycle_ms.append((time.perf_counter() - t0) * 1e3)  # incl. the reset on release
    return summary("warm_exec", backend, exec_ms), summary("warm_acquire_exec_release", backend, cycle_ms)


def throughput(backend: str, concurrency: int, per_thread: int) -> dict:
    with SandboxPool(backend, size=concurrency) as pool:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(per_thread):
                    with pool.acquire() as sb:
                        assert sb.exec(CMD).exit_code == 0
            except BaseException as exc:  # reported below; a thread must not die silently
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(concurrency)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    if errors:
        raise errors[0]
    total = concurrency * per_thread
    return {"bench": "throughput", "backend": backend, "concurrency": concurrency, "execs": total,
            "execs_per_s": round(total / wall, 1)}


def record(rows: list[dict], last: dict, load_start: str) -> None:
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [f"`python bench/sandbox.py --json --record` on {when}, {os.cpu_count()} CPUs shared with other jobs "
             f"({load_start} at the start, {results.load()} at the end), command `python3 -c pass`.", "",
             "| backend | measurement | p50 ms | p99 ms | execs/s |", "|---|---|---|---|---|"]
    for r in rows:
        name = r["bench"] if r["bench"] != "throughput" else f"throughput, concurrency {r['concurrency']}"
        lines.append(f"| {r['backend']} | {name} | {r.get('p50_ms', '')} | {r.get('p99_ms', '')} "
                     f"| {r.get('execs_per_s', '')} |")
    lines += ["", f"Goals: warm exec p50 <= 20 ms (bwrap: {last.get('bwrap_warm_p50_ms')}), "
                  f"<= 100 ms (docker: {last.get('docker_warm_p50_ms')})."]
    ratios = [f"{b} {last[f'{b}_warm_over_host']}" for b in ("bwrap", "docker") if f"{b}_warm_over_host" in last]
    if ratios:
        lines.append(f"Warm exec p50 / host subprocess.run p50 ({last['host_p50_ms']} ms): {', '.join(ratios)}.")
    results.record("sandbox", when, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--backends", default="bwrap,docker")
    ap.add_argument("-n", type=int, default=50, help="samples per latency measurement")
    ap.add_argument("--record", action="store_true", help="add the results to bench/RESULTS.md (under ## sandbox)")
    args = ap.parse_args()
    load_start = results.load()
    rows, last = [], {}

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)

    base = host(args.n)
    emit(base)
    last["host_p50_ms"] = base["p50_ms"]
    for backend in args.backends.split(","):
        emit(cold(backend, max(5, args.n // 3 if backend == "docker" else args.n)))
        w, cycle = warm(backend, args.n)
        emit(w)
        emit(cycle)
        last[f"{backend}_warm_p50_ms"] = w["p50_ms"]
        last[f"{backend}_warm_over_host"] = round(w["p50_ms"] / base["p50_ms"], 2)
        for c in (1, 4, 16):
            emit(throughput(backend, c, max(2, 64 // c)))
    print(json.dumps(last) if args.json else last, flush=True)
    if args.record:
        record(rows, last, load_start)


if __name__ == "__main__":
    main()
