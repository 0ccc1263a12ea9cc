"""Profile decode steps of the embedded engine on the bench-2b policy (needs CUDA; a tool, not a test).

    PYTHONPATH=. python bench/engine_profile.py [--batch 256] [--steps 3]

Steps the engine in this thread (no scheduler thread): admits `batch` prompts of 512 random tokens,
prefills them, then times decode steps and prints the torch profiler's table of the last `steps`,
the number of kernel launches per step, and where a decode step reads the device back to the host.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def syncs(step) -> dict[str, int]:
    """Run `step` once with torch's sync debug mode on; count the host syncs by the innermost frame
    of this repository's code that led to each (torch's own frame says nothing)."""
    import traceback
    sites: Counter = Counter()
    repo = str(Path(__file__).resolve().parents[1])
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(repo) and "bench" not in f.filename]
            f = ours[-1] if ours else traceback.extract_stack()[-2]
            sites[f"{Path(f.filename).name}:{f.lineno} {f.name}"] += 1
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
    finally:
        warnings.showwarning = show
    return dict(sites)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--kernels", help="write the GPU kernels of the profiled decode steps, in launch order, to this file")
    a = ap.parse_args()
    from bench.gpu import ENGINE_PROMPT, bench_2b_config
    from kpop.policy.checkpoint import build_model
    from kpop.rollout.embedded import EmbeddedEngine
    from kpop.rollout.engine import GenerationRequest, SamplingParams

    c = bench_2b_config()
    model = build_model(c, device="cuda", dtype=torch.bfloat16, seed=0)
    engine = EmbeddedEngine(model, None, max_seqs=a.batch, max_model_len=1024, max_batch_tokens=8192)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)
    for _ in range(a.batch):
        ids = torch.randint(2, c.vocab_size, (ENGINE_PROMPT,), generator=g).tolist()
        engine._add(GenerationRequest(prompt_token_ids=ids, params=params), concurrent.futures.Future())
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    engine._step()  # the first prefill chunk: kernel compiles
    torch.cuda.synchronize()
    print(f"first prefill step {time.perf_counter() - t0:.2f} s", flush=True)
    print(f"host syncs in one prefill chunk: {syncs(engine._step)}", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine._step()  # one prefill chunk of max_batch_tokens
        torch.cuda.synchronize()
    print("one prefill chunk (8192 tokens):", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
    t0 = time.perf_counter()
    while any(s.cached < len(s.context) - 1 for s in engine._running) or engine._waiting:
        engine._step()
    torch.cuda.synchronize()
    print(f"rest of prefill {time.perf_counter() - t0:.2f} s, stats {dict(engine.stats)}", flush=True)
    for _ in range(5):
        engine._step()
    torch.cuda.synchronize()
    for run in range(3):  # steps back to back (they overlap the host's read-back with the GPU), then one wait
        t0 = time.perf_counter()
        for _ in range(10):
            engine._step()
        torch.cuda.synchronize()
        print(f"decode steps at batch {a.batch}: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms each over 10", flush=True)
    sites = syncs(engine._step)
    print(f"host syncs in one decode step: {dict(sites)}", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            engine._step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    gpu_us = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"per step: {kernels / a.steps:.0f} GPU kernels/copies, {gpu_us / a.steps / 1e3:.2f} ms GPU busy", flush=True)
    print(ev.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60), flush=True)
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)
    if a.kernels:  # what fusions would remove: the sequence, with each kernel's time
        gpu = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
        Path(a.kernels).write_text("".join(f"{e.time_range.elapsed_us():9.2f} us  {e.name}\n" for e in gpu))


if __name__ == "__main__":
    main()
