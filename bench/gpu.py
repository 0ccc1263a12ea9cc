"""The policy at GPU speed: the MoE layer, the learner step and the MLA prefill, each as a ratio to
this same run's measured ceilings (a benchmark, not a test; needs CUDA).

    PYTHONPATH=. python bench/gpu.py [--json] [--record] [--only moe,learner,mla,engine,sync] [--sweep-moe]
                                     [--micro-batch-tokens 16384] [--steps 3] [--engine-new-tokens 256]

Ceilings, measured first: `copy_tb_s` (a 2 GiB device-to-device copy, bytes read + written) and
`gemm_tflops` (a dense bf16 8192^3 matmul on random data). Keys (goals in GOALS):
  moe_fwd_bwd_of_gemm          one bench-2b MoE layer (router + 32 routed experts top-8 + shared
                               expert), 65,536 tokens, forward+backward model TFLOP/s / gemm_tflops
  learner_mfu                  one learner step, 64 x 1,024-token trajectories (768 response tokens),
                               groups of 4, bf16, ZeRO-2 on one GPU: 6 x active non-embedding params
                               x tokens/s / gemm_tflops
  learner_peak_gb              peak allocated GPU memory over that step (learner_fp32_lm_head_s: the
                               fp32 LM head's share of the step; --bf16-lm-head measures without it)
  mla_prefill_fwd_vs_sdpa, mla_prefill_fwd_bwd_vs_sdpa   bench/kernels.py's MLA prefill bench
  engine_b256_tokens_per_s     the embedded engine on bench-2b: 256 prompts of 512 random tokens, 256
                               new tokens each, greedy, eos ignored; generated tokens / wall time
  engine_step_over_floor       its decode step over the all-weights-read-once time at copy_tb_s
  engine_b256_*_no_overlap     the same with each decode step read back before the next is launched
  engine_b256_bf16_state_*     the same (overlapped) with bf16 Lightning states (lightning_state_dtype)
  sync_gb_per_s, sync_ipc_gb_per_s   bench/sync.py: 4 GB of bf16 weights into an engine's parameters,
                               same process (GPU to GPU) and another process (CUDA IPC)
--json prints one JSON object last. --record adds a dated entry under "## gpu" in bench/RESULTS.md.
Each part is one function in BENCHES (the rollout engine adds its own).

The learner needs DeepSpeed and pydantic; where an import fails, that part reports its error and
the others still run. On a device image without them (and no network), bring wheels along:
    pip download -d .whl --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
        --platform any pydantic pydantic-core annotated-types typing-inspection hjson
    pip download --no-deps -d .whl deepspeed==0.19.8
and there, first:
    python3 -m pip install --no-deps .whl/*.whl
    DS_BUILD_OPS=0 python3 -m pip install --no-deps --no-build-isolation .whl/deepspeed-*.tar.gz

Floors at the bench-2b MoE layer (65,536 tokens, bf16): 11.2 TFLOP forward+backward (14 ms at
795 TFLOP/s; the goal 0.5 is 28 ms). Traffic of this design, each tensor once per pass that
needs it (weights and gradients, x, [g, u] written once and read twice, h, [dg, du], and the
(token, slot) rows of y and dx at 2 GB each, written and read back): ~17 GB, ~4 ms at 4.2 TB/s.
Arithmetic-bound by 3.5x; the per-row y and dx buffers are the largest traffic to cut next.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GOALS = {"moe_fwd_bwd_of_gemm": (">=", 0.5), "learner_mfu": (">=", 0.35), "learner_peak_gb": ("<=", 40.0),
         "mla_prefill_fwd_vs_sdpa": (">=", 1.0), "mla_prefill_fwd_bwd_vs_sdpa": (">=", 0.8),
         "engine_b256_tokens_per_s": (">=", 25000.0), "engine_step_over_floor": ("<=", 8.0),
         "sync_gb_per_s": (">=", 200.0), "sync_ipc_gb_per_s": (">=", 50.0)}
MOE_TOKENS = 65536
ENGINE_PROMPT = 512
TRAJECTORIES, TRAJ_TOKENS, RESPONSE_TOKENS, GROUP = 64, 1024, 768, 4


# -- arithmetic (no GPU needed) ----------------------------------------------------------------


def moe_layer_flops(c, tokens: int) -> float:
    """Model FLOPs of one MoE layer's forward + backward (3x the forward): router, k routed
    experts and the shared expert per token, 3 GEMMs of D x I per expert."""
    D, I = c.hidden_size, c.moe_intermediate_size
    per_token = 2 * (c.num_experts * D + 3 * D * I * (c.num_experts_per_tok + (c.num_shared_experts or 0)))
    return 3.0 * per_token * tokens


def mfu_params(c) -> int:
    """Active parameters a token's GEMMs use: active params minus the input embedding (a lookup,
    not a matmul); the LM head counts."""
    from kpop.policy.plan import plan_policy

    return plan_policy(c).active_params - c.vocab_size * c.hidden_size


def bench_2b_config():
    from kpop.policy.config import config_from_arch
    from kpop.policy.presets import bench_2b_arch

    return config_from_arch(bench_2b_arch(), source="bench-2b")


# -- timing ------------------------------------------------------------------------------------


def ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_tb_s() -> float:
    x = torch.randint(0, 255, (2 * 1024**3,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    return 2 * x.numel() / t / 1e9


def gemm_tflops(n: int = 8192) -> float:
    """Dense bf16 GEMM rate on random inputs (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: torch.mm(a, b, out=out))
    return 2 * n**3 / t / 1e9


# -- parts -------------------------------------------------------------------------------------


def bench_moe(ceil: dict, out: dict, sweep: bool) -> None:
    """One bench-2b MoE block, 65,536 tokens, bf16: forward and forward+backward through the
    grouped kernel (and the old per-expert loop once, for the record)."""
    from kernels.moe import grouped, moe_loop
    from kpop.policy.model import SparseMoeBlock

    c = bench_2b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = SparseMoeBlock(c)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.gate.weight.normal_(0, 0.5)  # decided routing, spread over the experts
    block.to(torch.bfloat16)
    x = torch.randn(MOE_TOKENS, c.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(MOE_TOKENS, c.hidden_size, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            block(x)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(dy)

    flops = moe_layer_flops(c, MOE_TOKENS)
    t_f, t_fb = ms(fwd), ms(fwd_bwd)
    rate = flops / (t_fb * 1e-3) / 1e12
    out.update(moe_fwd_ms=t_f, moe_fwd_tflops=flops / 3 / (t_f * 1e-3) / 1e12, moe_fwd_bwd_ms=t_fb,
               moe_fwd_bwd_tflops=rate, moe_fwd_bwd_of_gemm=rate / ceil["gemm_tflops"])
    with torch.no_grad():  # the per-expert loop this replaces (host sync per expert), forward only
        idx, w = block.gate(x)
        weights = [torch.stack(ws) for ws in block.expert_weights()]
        out["moe_loop_routed_fwd_ms"] = ms(lambda: moe_loop(x, idx, w, *weights))
    counts = torch.bincount(idx.flatten(), minlength=c.num_experts)
    out["moe_rows_max_over_mean"] = float(counts.max() / counts.float().mean())
    if sweep:
        out["moe_sweep"] = sweep_moe(fwd_bwd, grouped)


def sweep_moe(fwd_bwd: Callable, grouped) -> dict[str, float]:
    """fwd+bwd ms with one kernel's launch config changed at a time (the others at their default)."""
    alternatives = {
        "gate_up_fwd": [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 32, 8, 4)],
        "down_fwd": [(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 32, 8, 4)],
        "down_bwd_dh": [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 4)],
        "gate_up_bwd_dx": [(128, 64, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4)],
        "wgrad": [(128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3)],
    }
    default = dict(grouped.CFG_16)
    res = {"default": ms(fwd_bwd)}
    for name, cfgs in alternatives.items():
        for cfg in cfgs:
            grouped.CFG_16[name] = cfg
            try:
                res[f"{name} {cfg}"] = ms(fwd_bwd)
            except Exception as e:  # a config over the shared memory fails at launch: say so, go on
                res[f"{name} {cfg}"] = f"{type(e).__name__}: {str(e)[:120]}"
            grouped.CFG_16[name] = default[name]
    return res


def learner_batch(vocab: int, seed: int = 0) -> list:
    """64 trajectories of 1,024 tokens (256 prompt + 768 response), 16 groups of 4 with rewards
    that differ inside each group (dynamic filtering keeps them all)."""
    from kpop.trajectory import Trajectory

    g = torch.Generator().manual_seed(seed)
    prompt_len = TRAJ_TOKENS - RESPONSE_TOKENS
    out = []
    for k in range(TRAJECTORIES // GROUP):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
        for j in range(GROUP):
            ids = prompt + torch.randint(2, vocab, (RESPONSE_TOKENS,), generator=g).tolist()
            mask = [0] * prompt_len + [1] * RESPONSE_TOKENS
            lps = (-torch.rand(RESPONSE_TOKENS, generator=g) * 8).tolist()
            out.append(Trajectory(run_id="bench", task_id=f"t{k}", env_id="bench", group_id=f"g{k}", token_ids=ids,
                                  logprobs=[0.0] * prompt_len + lps, loss_mask=mask, reward=float(j % 2),
                                  segments=[(prompt_len, TRAJ_TOKENS, 0)]))
    return out


def bench_learner(ceil: dict, out: dict, micro_batch_tokens: int, steps: int, bf16_lm_head: bool = False) -> None:
    """Learner steps on the bench-2b policy (bf16, ZeRO-2, one GPU, activation checkpointing on).
    `bf16_lm_head`: the LM head in bf16 instead of Ring-2.6's fp32 (to measure what fp32 costs)."""
    from kpop.config import AlgorithmConfig, LearnerConfig
    from kpop.policy.checkpoint import build_model
    from learner.learner import Learner

    c = bench_2b_config()
    model = build_model(c, device="cuda", seed=0)
    model.fp32_lm_head = not bf16_lm_head
    out["learner_lm_head"] = "bf16" if bf16_lm_head else "fp32"
    lcfg = LearnerConfig(lr=1e-6, zero_stage=2, dtype="bfloat16", num_gpus=1, micro_batch_tokens=micro_batch_tokens)
    learner = Learner(lcfg, AlgorithmConfig(), model)
    batch = learner_batch(c.vocab_size)
    learner.train_step(batch)  # compiles the kernels and allocates the optimizer state
    torch.cuda.synchronize()
    states_gb = torch.cuda.memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    times, last = [], {}
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        last = learner.train_step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = TRAJECTORIES * TRAJ_TOKENS
    n = mfu_params(c)
    out.update(learner_step_s=step_s, learner_tokens_per_s=tokens / step_s,
               learner_mfu=6 * n * tokens / step_s / 1e12 / ceil["gemm_tflops"],
               learner_peak_gb=torch.cuda.max_memory_allocated() / 1e9, learner_model_states_gb=states_gb,
               learner_micro_batches=last.get("micro_batches"), learner_checkpointed_layers=learner.checkpointed_layers,
               learner_mfu_params=n, learner_moe_load_max=max((v for k, v in last.items() if k.startswith("moe_load_max/")), default=None))
    # where one more step reads the device back to the host (file:line -> count): the micro-batch
    # loop should show none; the forward's cu_seqlens check and the MLA prefill's longest-sequence
    # read are known; after the step, the norm and the expert-load report are expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            learner.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    out["learner_host_sync_sites"] = dict(sites)
    # the fp32 LM head (Ring-2.6 keeps it fp32 for train/infer match) over the step's tokens:
    # forward, backward and the chunked recompute: a share of the step no bf16 GEMM rate applies to
    h = torch.randn(micro_batch_tokens, c.hidden_size, device="cuda", requires_grad=True)
    w = torch.randn(c.vocab_size, c.hidden_size, device="cuda", requires_grad=True)
    t_head = ms(lambda: torch.autograd.grad(torch.nn.functional.linear(h, w).logsumexp(-1).sum(), (h, w)))
    out["learner_fp32_lm_head_s"] = t_head * 1e-3 * 4 / 3 * tokens / micro_batch_tokens  # + recompute


def bench_engine(ceil: dict, out: dict, new_tokens: int, batches: tuple[int, ...] = (256,)) -> None:
    """The embedded engine on the bench-2b policy (bf16): prompts of ENGINE_PROMPT random tokens,
    `new_tokens` new ones each, greedy, eos ignored, all requests submitted at once.

    engine_b{B}_tokens_per_s   generated tokens / wall time of the whole generate (prefill included)
    engine_b{B}_step_ms        one decode step: (wall(new) - wall(1)) / (new - 1), the same requests
                               run once to their first token and once to `new_tokens`
    engine_step_over_floor     batch 256's step over the all-weights-read-once time at this run's
                               copy rate (parameter bytes / copy bytes per second)
    engine_b256_*_no_overlap, engine_b256_bf16_state_*   batch 256 again (same prompts): without
                               overlap; with bf16 Lightning state storage"""
    from kpop.policy.checkpoint import build_model
    from kpop.rollout.embedded import EmbeddedEngine
    from kpop.rollout.engine import GenerationRequest, SamplingParams

    c = bench_2b_config()
    model = build_model(c, device="cuda", dtype=torch.bfloat16, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = weight_bytes / (ceil["copy_tb_s"] * 1e12) * 1e3
    out.update(engine_weight_gb=weight_bytes / 1e9, engine_floor_ms=floor_ms)
    g = torch.Generator().manual_seed(0)
    by_batch: dict[int, list[list[int]]] = {}
    variants = [(B, True, "float32") for B in batches]
    if 256 in batches:
        variants += [(256, False, "float32"), (256, True, "bfloat16")]
    for B, overlap, state_dtype in variants:
        engine = EmbeddedEngine(model, None, max_seqs=B, max_model_len=ENGINE_PROMPT + new_tokens + 64,
                                max_batch_tokens=max(8192, B), overlap=overlap, lightning_state_dtype=state_dtype)
        if B not in by_batch:
            by_batch[B] = [torch.randint(2, c.vocab_size, (ENGINE_PROMPT,), generator=g).tolist() for _ in range(B)]
        prompts = by_batch[B]

        def run(new: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in prompts]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = engine.generate(reqs)
            torch.cuda.synchronize()
            assert all(len(r.token_ids) == new for r in res)
            return time.perf_counter() - t0

        try:
            run(4)  # warm-up: kernel compiles, CUDA graph captures
            t1, tn = run(1), run(new_tokens)
            step_ms = (tn - t1) / (new_tokens - 1) * 1e3
            if not overlap:  # the baseline: each step read back before the next is launched
                out["engine_b256_tokens_per_s_no_overlap"] = B * new_tokens / tn
                out["engine_b256_step_ms_no_overlap"] = step_ms
                out["engine_b256_stats_no_overlap"] = dict(engine.stats)
                print(f"engine batch {B} without overlap: {B * new_tokens / tn:,.0f} tokens/s, decode step {step_ms:.2f} ms",
                      flush=True)
                continue
            if state_dtype == "bfloat16":
                out["engine_b256_bf16_state_tokens_per_s"] = B * new_tokens / tn
                out["engine_b256_bf16_state_step_ms"] = step_ms
                out["engine_b256_bf16_state_stats"] = dict(engine.stats)
                print(f"engine batch {B} with bf16 Lightning states: {B * new_tokens / tn:,.0f} tokens/s, "
                      f"decode step {step_ms:.2f} ms", flush=True)
                continue
            out[f"engine_b{B}_tokens_per_s"] = B * new_tokens / tn
            out[f"engine_b{B}_step_ms"] = step_ms
            out[f"engine_b{B}_prefill_s"] = t1
            if B == 256:
                out["engine_step_over_floor"] = step_ms / floor_ms
            out[f"engine_b{B}_stats"] = dict(engine.stats)
            print(f"engine batch {B}: {B * new_tokens / tn:,.0f} tokens/s, decode step {step_ms:.2f} ms "
                  f"({step_ms / floor_ms:.1f}x the {floor_ms:.2f} ms weight-read floor), prefill {t1:.2f} s", flush=True)
        finally:
            engine.close()
            del engine
            torch.cuda.empty_cache()


def bench_sync(ceil: dict, out: dict) -> None:
    """bench/sync.py's two transports (same process; another process through CUDA IPC), 4 GB of bf16."""
    # Imported by package name (not from its path) so the IPC consumer process can unpickle its target.
    import bench.sync as bs

    state = bs.make_weights(int(4e9), "cuda")
    out["sync_gb"] = bs.nbytes(state) / 1e9
    out["sync_gb_per_s"] = bs.sync_gb_per_s(state, "cuda", 256 << 20)
    out["sync_ipc_gb_per_s"] = bs.sync_ipc_gb_per_s(state, "cuda", 256 << 20)


def bench_mla(ceil: dict, out: dict) -> None:
    """bench/kernels.py's MLA prefill bench (B2 T8192 H64, ours 192/128 vs SDPA 128), its ratios."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    bk.bench_mla_prefill(False)
    out.update({k: bk.HEADLINE[k] for k in ("mla_prefill_fwd_vs_sdpa", "mla_prefill_fwd_bwd_vs_sdpa") if k in bk.HEADLINE})


def bench_loop(ceil: dict, out: dict, a: argparse.Namespace) -> None:
    """`--loop`: the whole RL loop colocated on this GPU (bench/loop.py: rollout engine, stream,
    learner and same-process weight sync) for `--loop-steps` learner steps on bench-2b, prompts of
    512 tokens and replies of 256, 32 trajectories a step; loop_* keys (bench/loop.py says each,
    and what a run should cost)."""
    from bench.loop import bench_loop as run

    out.update(run("bench-2b", steps=a.loop_steps))


GOALS["loop_gpu_busy"] = (">=", 0.8)


BENCHES: dict[str, Callable[[dict, dict, argparse.Namespace], None]] = {
    "moe": lambda ceil, out, a: bench_moe(ceil, out, a.sweep_moe),
    "learner": lambda ceil, out, a: bench_learner(ceil, out, a.micro_batch_tokens, a.steps, a.bf16_lm_head),
    "mla": lambda ceil, out, a: bench_mla(ceil, out),
    "engine": lambda ceil, out, a: bench_engine(ceil, out, a.engine_new_tokens, tuple(a.engine_batches)),
    "sync": lambda ceil, out, a: bench_sync(ceil, out),
}


def versions() -> dict[str, str]:
    import triton

    v = {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda)}
    try:
        import deepspeed

        v["deepspeed"] = deepspeed.__version__
    except ImportError:
        v["deepspeed"] = "not installed"
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--record", action="store_true", help='add a dated entry under "## gpu" in bench/RESULTS.md')
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--sweep-moe", action="store_true", help="also time alternative MoE kernel launch configs")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps (after one warm-up step)")
    ap.add_argument("--bf16-lm-head", action="store_true",
                    help="learner with the LM head in bf16 (Ring-2.6 keeps it fp32): what the fp32 head costs")
    ap.add_argument("--engine-new-tokens", type=int, default=256, help="new tokens per request in the engine part")
    ap.add_argument("--engine-batches", type=int, nargs="+", default=[256], help="engine batch sizes (256 sets the goal keys)")
    ap.add_argument("--loop", action="store_true",
                    help="also run the colocated RL loop on bench-2b (bench/loop.py); --only '' --loop runs it alone")
    ap.add_argument("--loop-steps", type=int, default=4, help="timed learner steps of --loop (after one warm-up step)")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; known: {', '.join(BENCHES)}")
    if not torch.cuda.is_available():
        msg = "bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured"
        print(msg, file=sys.stderr)
        if a.json:
            print(json.dumps({"error": msg}))
        return 2
    os.environ.setdefault("KPOP_KERNELS", "auto")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out: dict = {"date": when, "device": torch.cuda.get_device_name(), "versions": versions()}
    ceil = {"copy_tb_s": copy_tb_s(), "gemm_tflops": gemm_tflops()}
    out.update(ceil)
    print(f"{when}, {out['device']}, {out['versions']}: copy {ceil['copy_tb_s']:.2f} TB/s, "
          f"bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s", flush=True)
    errors = {}
    for name in only + ["loop"] * a.loop:
        try:
            BENCHES.get(name, bench_loop)(ceil, out, a)
        except Exception as e:  # one part failing (a missing package, out of memory) leaves the others
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        torch.cuda.empty_cache()
    met = {k: (out[k] >= goal if op == ">=" else out[k] <= goal) for k, (op, goal) in GOALS.items() if k in out}
    out.update(goals={k: f"{op} {g}" for k, (op, g) in GOALS.items()}, met=met, errors=errors)
    for k in GOALS:
        if k in out:
            print(f"{k:32s} {out[k]:.3f}   goal {GOALS[k][0]} {GOALS[k][1]}   {'met' if met[k] else 'NOT met'}")
    if a.record:
        from bench import results

        body = ["| key | value | goal |", "|---|---|---|"]
        body += [f"| {k} | {v:.4g} | {' '.join(map(str, GOALS[k])) if k in GOALS else ''} |"
                 for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        body += ["", f"versions: {out['versions']}"] + [f"error in {k}: {v}" for k, v in errors.items()]
        results.record("gpu", f"{when}, {out['device']}", body)
    if a.json:
        print(json.dumps(out, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
