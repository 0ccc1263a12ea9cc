"""Weight-sync throughput: learner weights -> an engine's parameters (a benchmark, not a test).

    PYTHONPATH=. python bench/sync.py [--json] [--gb 4.0] [--bucket-mb 256] [--iters 5]
    PYTHONPATH=. python bench/sync.py --cpu --gb 0.25     # smoke numbers without a GPU

A state of bf16 tensors shaped like a bench-2b layer stack (~4 GB by default) goes through
`CopySync` (same process, GPU to GPU) and `IpcSync` (to a second process on the same GPU through
CUDA IPC handles), each time ending in the engine's copy into its own parameters, checksums
verified as in a run. GB/s = weight bytes / wall time of publish + receive + load, median of
--iters versions. `copy_gb_per_s` is this run's plain device copy of 1 GiB (bytes copied per
second) so the sync numbers read against what the memory allows. Issue goals: sync_gb_per_s
>= 200, sync_ipc_gb_per_s >= 50. The last line with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from kpop.weight_sync import CopySync, IpcSync  # noqa: E402

HIDDEN, FFN = 2048, 5632


def make_weights(total_bytes: int, device: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random tensors of a dense-layer stack (attention 4 x h*h, MLP 3 x h*ffn, a norm) up to `total_bytes`."""
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN), (HIDDEN,)]
    state: dict[str, torch.Tensor] = {}
    used, layer, size = 0, 0, torch.tensor([], dtype=dtype).element_size()
    while used < total_bytes:
        for i, shape in enumerate(shapes):
            t = torch.randn(shape, device=device, dtype=dtype)
            state[f"model.layers.{layer}.w{i}"] = t
            used += t.numel() * size
        layer += 1
    return state


def nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load(dst: dict[str, torch.Tensor], src) -> None:
    """The engine's part: copy the received views into its own parameters."""
    torch._foreach_copy_([dst[k] for k in src], list(src.values()))


def copy_gb_per_s(device: str, iters: int = 5) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return a.numel() / statistics.median(times) / 1e9


def sync_gb_per_s(state, device: str, bucket_bytes: int, iters: int = 5) -> float:
    """CopySync: publish into buckets on `device`, receive views, load into the engine's params."""
    sync = CopySync(device, bucket_bytes=bucket_bytes)
    params = {k: torch.empty_like(v, device=device) for k, v in state.items()}
    times = []
    for version in range(iters + 1):  # version 0 allocates the buckets: not timed
        _sync(device)
        t0 = time.perf_counter()
        h = sync.publish(state, version)
        _load(params, sync.receive(h))
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert all(torch.equal(params[k], state[k]) for k in list(state)[:4])
    return nbytes(state) / statistics.median(times[1:]) / 1e9


def _ipc_consumer(device: str, handles, done) -> None:
    sync = IpcSync()
    params = None
    while (h := handles.get()) is not None:
        got = sync.receive(h)
        if params is None:
            params = {k: torch.empty_like(v, device=device) for k, v in got.items()}
        _load(params, got)
        _sync(device)
        done.put(h.version)


def sync_ipc_gb_per_s(state, device: str, bucket_bytes: int, iters: int = 5) -> float:
    """IpcSync: the learner (this process) publishes; an engine process on the same device maps
    the buckets (CUDA IPC, or /dev/shm on CPU) and loads them into its params. Round trip per version."""
    ctx = mp.get_context("spawn")
    handles, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_consumer, args=(device, handles, done), daemon=True)
    proc.start()
    sync = IpcSync(device, bucket_bytes=bucket_bytes)
    times = []
    try:
        for version in range(iters + 1):  # version 0: the consumer maps and allocates, not timed
            _sync(device)
            t0 = time.perf_counter()
            handles.put(sync.publish(state, version))
            if done.get(timeout=600) != version:
                raise RuntimeError("the engine process loaded the wrong version")
            times.append(time.perf_counter() - t0)
    finally:
        handles.put(None)
        proc.join(timeout=60)
        sync.close()
    return nbytes(state) / statistics.median(times[1:]) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (a smoke number, not the goal)")
    ap.add_argument("--gb", type=float, default=None, help="weight bytes in GB (default 4.0 on GPU, 0.25 on CPU)")
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("bench/sync.py measures GPU weight sync and needs a CUDA GPU; --cpu gives a smoke number", file=sys.stderr)
        return 2
    device = "cpu" if a.cpu else "cuda"
    gb = a.gb if a.gb is not None else (0.25 if a.cpu else 4.0)
    bucket_bytes = int(a.bucket_mb * (1 << 20))
    state = make_weights(int(gb * 1e9), device)
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "weight_gb": nbytes(state) / 1e9,
        "bucket_mb": a.bucket_mb,
        "tensors": len(state),
        "copy_gb_per_s": copy_gb_per_s(device),
        "sync_gb_per_s": sync_gb_per_s(state, device, bucket_bytes, a.iters),
        "sync_ipc_gb_per_s": sync_ipc_gb_per_s(state, device, bucket_bytes, a.iters),
    }
    out["sync_over_copy"] = out["sync_gb_per_s"] / out["copy_gb_per_s"]
    out["sync_ipc_over_copy"] = out["sync_ipc_gb_per_s"] / out["copy_gb_per_s"]
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22} {v:.3f}" if isinstance(v, float) else f"{k:22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
