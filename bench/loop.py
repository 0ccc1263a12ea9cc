"""The whole RL loop on one device (actors/colocate.py): rollout, stream, learner and weight sync
together, for a fixed number of learner steps after warm-up steps (a benchmark, not a test).

    PYTHONPATH=. python bench/loop.py [--preset bench-2b] [--steps 3] [--json]   # needs CUDA for bench-2b
    PYTHONPATH=. python bench/loop.py --cpu-smoke --json                         # tiny policy, CPU, seconds
    (bench/gpu.py --loop runs the bench-2b case on the GPU beside the other parts)

The task is synthetic, of fixed lengths and needs no download: `bench/fixedlen-v0` asks a one-turn
question of `--prompt-tokens` tokens (single-token words; the chat template included) and the
policy answers with up to `--response-tokens` tokens; a cheap verifier scores the share of the
prompt's words the answer repeats. Keys:
  loop_trajectories_per_s   trajectories trained per wall second over the timed steps
  loop_tokens_per_s         their tokens (prompt + response) per wall second
  loop_generated_tokens_per_s  tokens the engines sampled per wall second
  loop_gpu_busy             share of wall time the GPU was busy; `loop_gpu_busy_method` says how:
                            "nvml" (NVML utilization sampled every 50 ms: the share of time a
                            kernel ran), else "cuda_event_spans" (the union of the engine-step,
                            learner-step and weight-sync spans on the GPU's timeline, from CUDA
                            events: an upper bound, as a span counts the GPU's waits for the host
                            inside a step); on CPU "host_clock_spans" (the same union, host clock)
  loop_gpu_span_share       the span union, whatever the method above
  loop_staleness_mean       mean version lag of the trained samples
  loop_sync_s_per_step      wall seconds of one weight sync (publish + every engine's pull)
  loop_build_s, loop_warmup_s   seconds from the bench's start until the loop is built (prompt
                            calibration, policies, DeepSpeed, engine), then for the first weight sync
                            and the warm-up steps (kernel compiles, CUDA-graph capture)

Progress goes to stderr as it happens, each line with the seconds since the bench began (phases,
every learner step with its rollout-wait / learn / sync split, and a heartbeat every 10 s with the
episodes and tokens so far), so a run cut off by a time limit still says where it was.

The default shape and what it should cost on one H200 (bench-2b: 2.0 B parameters, 0.82 B of them
in a token's GEMMs; 32 trajectories of 512 + 256 tokens a step, 64 episodes in flight):
  start-up      imports + DeepSpeed ~10 s; each of the two policy copies (learner, engine) is
                initialised on the CPU (2 B normal draws from the CPU generator, serial whatever
                the thread count: ~5-10 s each, 6 ns a draw on a 2-core dev box), then DeepSpeed
                allocates ZeRO-2's fp32 master and Adam states (~24 GB) on the GPU (a few s)
  first step    CUDA-graph capture of 11 decode buckets (<= 64) and the decode kernels' compile
                (~10 s); 64 prompts prefilled and 256 decode steps at batch 64 (~12 ms each: ~4 s);
                the warm-up learner step compiles the MoE, Lightning and MLA Triton kernels of the
                forward and backward (~20-40 s on a cold Triton cache)
  a timed step  8,192 sampled tokens at ~5-6k tokens/s (~1.5 s) beside one learner step of 24,576
                tokens (8 x 0.82 B x tokens with the activation recompute: 1.6e14 FLOP, ~1-2 s at
                10-20% of the bf16 GEMM peak) and a 4 GB weight sync (<0.1 s): ~3 s
  so ~70-100 s in all for a warm-up and 3 timed steps. The old default (64 trajectories, 128 in
  flight) doubled every step, and each `rl()` call ended with a learner checkpoint: ~28 GB for
  bench-2b (bf16 weights, fp32 master, Adam), one before the timed steps and one inside them. The
  bench skips checkpoints (it measures the loop, not the disk).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from environments.core import ChatEnv, Message, Task  # noqa: E402
from environments.tools import Toolbox  # noqa: E402

ENV_ID = "bench/fixedlen-v0"


class FixedLengthEnv(ChatEnv):
    """One turn: a prompt of `words` single-token words; reward = share of them the answer repeats."""

    VOCAB = tuple("abcdefghilmnoprstuvwxyz")  # " a", " b", ...: one token each in the local tokenizer

    def __init__(self, words: int = 500, vocab: str = "".join(VOCAB), render_mode: str | None = None) -> None:
        super().__init__(max_turns=1, render_mode=render_mode, show_tools=False)
        self.words, self.vocab = words, vocab

    def _new_task(self, rng: Any, options: dict[str, Any]) -> Task:
        words = [self.vocab[i] for i in rng.integers(0, len(self.vocab), self.words)]
        prompt = " ".join(words)
        return Task(task_id=f"fixedlen-{self.words}-{zlib.crc32(prompt.encode()):08x}", prompt=prompt,
                    data={"words": sorted(set(words))})

    def _toolbox(self, task: Task) -> Toolbox:
        return Toolbox([])

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        said = set((final or {}).get("content") or "")
        want = self.task.data["words"]
        hit = sum(w in said for w in want)
        return hit / len(want), {"repeated": hit}

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        return {"role": "assistant", "content": " ".join(self.task.data["words"])}


def _register() -> None:
    from environments.registry import register

    try:
        register(ENV_ID, FixedLengthEnv)
    except ValueError:  # already registered in this process
        pass


def single_token_vocab(tokenizer: Any) -> str:
    """The letters that are one token after a space in this tokenizer (tokenizer builds differ)."""
    vocab = "".join(c for c in FixedLengthEnv.VOCAB if len(tokenizer.encode(" " + c, add_special_tokens=False)) == 1)
    if len(vocab) < 4:
        raise ValueError(f"only {len(vocab)} letters are single tokens in this tokenizer: cannot build fixed prompts")
    return vocab


def prompt_words(tokenizer: Any, prompt_tokens: int, vocab: str = "".join(FixedLengthEnv.VOCAB)) -> int:
    """How many words make the rendered chat prompt exactly `prompt_tokens` tokens long."""
    from kpop.rollout.chat import ChatClient

    client = ChatClient(None, tokenizer)
    overhead = len(client.encode(client.render([{"role": "user", "content": vocab[0]}]))) - 1
    n = prompt_tokens - overhead
    if n < 1:
        raise ValueError(f"--prompt-tokens {prompt_tokens} is shorter than the chat template ({overhead + 1} tokens)")
    for seed in range(4):  # real prompts: each word one token, no merges across words
        messages, _ = FixedLengthEnv(n, vocab).reset(seed=seed)
        got = len(client.encode(client.render(messages)))
        if got != prompt_tokens:
            raise ValueError(f"{n} words render to {got} tokens, not {prompt_tokens}: the tokenizer splits or "
                             "merges them")
    return n


def loop_config(out_dir: Path, preset: str, prompt_tokens: int, response_tokens: int, batch: int, group: int,
                concurrent: int, cuda: bool, staleness: int) -> Any:
    from kpop.config import RunConfig
    from kpop.policy.tokenizer import get_tokenizer

    tok = get_tokenizer()
    vocab = single_token_vocab(tok)
    words = prompt_words(tok, prompt_tokens, vocab)
    gpu = {"num_gpus": 1} if cuda else {}
    return RunConfig.model_validate({
        "name": "loop", "run_dir": str(out_dir), "resume": False,
        "policy": {"preset": preset, "dtype": "bfloat16" if cuda else "float32"},
        # max_episode_tokens + 1: a reply ends at max_new_tokens, not as an episode cut at its budget
        "rollout": {"max_concurrent_episodes": concurrent, "group_size": group, "max_new_tokens": response_tokens,
                    "max_episode_tokens": prompt_tokens + response_tokens + 1, "max_turns": 1,
                    **({"num_gpus": 1.0, "gpu_memory_fraction": 0.35} if cuda else {})},
        "environments": {"train": [{"id": ENV_ID, "kwargs": {"words": words, "vocab": vocab}}]},
        "learner": {"lr": 1e-6, "zero_stage": 2 if cuda else 1, "dtype": "bfloat16" if cuda else "float32",
                    "micro_batch_tokens": 16384 if cuda else 4096, "checkpoint_every": 10**6,
                    "expert_bias_update_rate": 0.0, **gpu},
        "algorithm": {"dynamic_filter": False},
        "schedule": {"rl_steps": 10**6, "batch_size": batch, "max_staleness": staleness, "eval_before_rl": False},
        "logging": {"tensorboard": False, "progress": False, "level": "WARNING"},
    })


class Spans:
    """Start/end marks of engine and learner work on one timeline: CUDA events (the GPU's clock)
    or the host clock. `share(t0, t1)` is their union's share of [t0, t1] (overlaps count once)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()
        if cuda:
            self.ref = self._mark()

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                end = self._mark()
                with self._lock:
                    self.marks.append((start, end))
        return timed

    def now(self) -> Any:
        return self._mark()

    def _s(self, mark: Any) -> float:
        return self.ref.elapsed_time(mark) / 1e3 if self.cuda else mark

    def share(self, t0: Any, t1: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        lo, hi = self._s(t0), self._s(t1)
        with self._lock:
            spans = sorted((max(self._s(a), lo), min(self._s(b), hi)) for a, b in self.marks)
        busy, end = 0.0, lo
        for a, b in spans:
            if b <= end:
                continue
            busy += b - max(a, end)
            end = b
        return busy / max(hi - lo, 1e-9)


class NvmlSampler:
    """NVML GPU utilization sampled every `every_s` on a thread (None when pynvml is missing)."""

    def __init__(self, every_s: float = 0.05) -> None:
        import pynvml  # ImportError: the caller falls back to the spans

        pynvml.nvmlInit()
        self.nvml, self.every_s = pynvml, every_s
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-nvml")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return statistics.fmean(self.samples) if self.samples else float("nan")


class Reporter:
    """Progress lines on stderr, flushed at once, each with the seconds since the bench began; a
    heartbeat thread repeats the current phase and the loop's counters every `every_s` seconds, so a
    run cut off by a time limit still says where it was and how far it got."""

    def __init__(self, every_s: float = 10.0, stream: Any = None) -> None:
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.phase = "starting"
        self.loop: Any = None  # set once built: the heartbeat reads its counters
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), daemon=True, name="bench-progress")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        print(f"[loop {self.elapsed():7.1f}s] {msg}", file=self.stream, flush=True)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.say(phase)

    def counters(self) -> str:
        loop = self.loop
        if loop is None:
            return ""
        def total(key: str) -> int:
            return sum(w.engine.stats[key] for w in loop.workers)
        return (f"episodes finished {sum(w.finished for w in loop.workers)}, in flight {len(loop._running)}; "
                f"engine steps {total('steps')}, tokens decoded {total('decode_tokens')} prefilled "
                f"{total('prefill_tokens')}; learner steps {loop.state.rl_step}")

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.say(f"... still: {self.phase}" + (f" | {c}" if (c := self.counters()) else ""))
            except Exception as exc:  # a counter read racing the loop's close: say so, keep beating
                self.say(f"... still: {self.phase} (counters unreadable: {type(exc).__name__})")

    def __enter__(self) -> "Reporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class _ElapsedFilter(logging.Filter):
    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    def filter(self, record: logging.LogRecord) -> bool:
        record.elapsed = self.reporter.elapsed()
        return True


def _show_logs(reporter: Reporter) -> Callable[[], None]:
    """The loop's own INFO lines (what it builds and how long each took) beside the progress lines;
    returns the undo."""
    handler = logging.StreamHandler(reporter.stream)
    handler.addFilter(_ElapsedFilter(reporter))
    handler.setFormatter(logging.Formatter("[loop %(elapsed)7.1fs] %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("kpop.train", "learner.learner")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)

    def undo() -> None:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    return undo


def _instrument(loop: Any, spans: Spans, rep: Reporter) -> None:
    """Time the engines' steps, the learner's steps and the weight syncs on the spans' timeline, and
    report each learner step as it starts and ends, and each step's wall split after its sync."""
    for w in loop.workers:
        w.engine._step = spans.wrap(w.engine._step)  # the engine thread's one step
    learner = loop.learner.learner
    train_step = spans.wrap(learner.train_step)
    last = {"learn_s": 0.0, "mark": time.perf_counter()}

    def reported_train_step(trajectories: Any, *args: Any, **kwargs: Any) -> Any:
        n = loop.state.rl_step + 1
        tokens = sum(len(t.token_ids) for t in trajectories)
        rep.say(f"learner step {n}: starts on {len(trajectories)} trajectories, {tokens} tokens"
                + (" (the first one compiles the learner's Triton kernels)" if n == 1 and spans.cuda else ""))
        t = time.perf_counter()
        out = train_step(trajectories, *args, **kwargs)
        last["learn_s"] = time.perf_counter() - t
        rep.say(f"learner step {n}: learned in {last['learn_s']:.1f} s")
        return out

    learner.train_step = reported_train_step
    sync = spans.wrap(loop.sync_weights)

    def reported_sync() -> float:
        dt = sync()
        now = time.perf_counter()
        wall, learn = now - last["mark"], last["learn_s"]
        if loop.state.rl_step:
            rep.say(f"step {loop.state.rl_step}: {wall:.1f} s = waiting for rollouts {max(wall - learn - dt, 0.0):.1f}"
                    f" + learn {learn:.1f} + sync {dt:.2f} | {rep.counters()}")
        else:
            rep.say(f"weights version {loop.version} on every engine ({dt:.2f} s)")
        last["mark"], last["learn_s"] = now, 0.0
        return dt

    loop.sync_weights = reported_sync  # device copies and checksums
    # the bench measures the loop, not the disk: a bench-2b checkpoint (bf16 weights, fp32 master
    # and Adam states) is ~28 GB, and `rl()` writes one when it reaches its last step
    loop.checkpoint = lambda: rep.say("checkpoint skipped (a benchmark)")


def bench_loop(preset: str = "bench-2b", steps: int = 3, warmup: int = 1, prompt_tokens: int = 512,
               response_tokens: int = 256, batch: int = 32, group: int = 4, concurrent: int = 64,
               staleness: int = 1, cpu: bool = False) -> dict[str, Any]:
    """Run the colocated loop `warmup` + `steps` learner steps; the keys above, for the timed steps."""
    from actors.colocate import ColocatedLoop
    from kpop.metrics import read_metrics

    cuda = torch.cuda.is_available() and not cpu
    if preset == "bench-2b" and not cuda:
        raise SystemExit("bench/loop.py: bench-2b needs a CUDA GPU; use --cpu-smoke (tiny policy) on CPU")
    _register()
    with Reporter() as rep, tempfile.TemporaryDirectory(prefix="kpop-loop-") as tmp:
        undo_logs = _show_logs(rep)
        try:
            rep.enter(f"config: {preset} on {'cuda' if cuda else 'cpu'}, {batch} trajectories of {prompt_tokens} + "
                      f"{response_tokens} tokens a step, {concurrent} episodes in flight, {warmup} warm-up + "
                      f"{steps} timed steps (calibrating the prompt length)")
            cfg = loop_config(Path(tmp), preset, prompt_tokens, response_tokens, batch, group, concurrent, cuda,
                              staleness)
            rep.enter("building the loop: learner (policy + DeepSpeed), then the rollout engine")
            loop = ColocatedLoop(cfg)
            build_s = rep.elapsed()
            try:
                where = {str(loop.learner.learner.device.type), loop.device}
                if where != {"cuda" if cuda else "cpu"}:  # a CPU learner beside a GPU engine would time the CPU
                    raise RuntimeError(f"bench/loop.py: learner on {loop.learner.learner.device}, engines on "
                                       f"{loop.device}; expected both on {'cuda' if cuda else 'cpu'}")
                rep.loop = loop
                spans = Spans(cuda)
                _instrument(loop, spans, rep)
                rep.enter("first weight sync")
                loop.sync_weights()
                rep.enter(f"warm-up: {warmup} learner step(s)"
                          + ("; the first decode step captures the CUDA graphs" if cuda else ""))
                loop.rl(steps=warmup)
                warmup_s = rep.elapsed() - build_s
                generated0 = sum(w.engine.stats["decode_tokens"] for w in loop.workers)
                sampler = None
                if cuda:
                    try:
                        sampler = NvmlSampler()
                    except Exception:  # no pynvml or no NVML: the spans say it
                        sampler = None
                rep.enter(f"timed: {steps} learner step(s)")
                t0, wall0 = spans.now(), time.perf_counter()
                loop.rl(steps=steps)
                t1, wall = spans.now(), time.perf_counter() - wall0
                nvml = sampler.stop() if sampler is not None else None
                generated = sum(w.engine.stats["decode_tokens"] for w in loop.workers) - generated0
                span_share = spans.share(t0, t1)
                rows = read_metrics(loop.run_dir, phase="rl")[warmup:]
                rep.enter(f"done: {len(rows)} timed steps in {wall:.1f} s; closing the loop")
            finally:
                rep.loop = None
                loop.close()
        finally:
            undo_logs()
    method = "nvml" if nvml is not None else "cuda_event_spans" if cuda else "host_clock_spans"
    trained = sum(r["used"] for r in rows)
    return {
        "loop_preset": preset,
        "loop_device": torch.cuda.get_device_name() if cuda else "cpu",
        "loop_steps": len(rows),
        "loop_trajectories_per_s": trained / wall,
        "loop_tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "loop_generated_tokens_per_s": generated / wall,
        "loop_gpu_busy": nvml if nvml is not None else span_share,
        "loop_gpu_busy_method": method,
        "loop_gpu_span_share": span_share,
        "loop_staleness_mean": statistics.fmean(r["staleness_mean"] for r in rows),
        "loop_sync_s_per_step": statistics.fmean(r["sync_s"] for r in rows),
        "loop_reward_mean": statistics.fmean(r["task_reward_mean"] for r in rows),
        "loop_wall_s": wall,
        "loop_build_s": build_s,
        "loop_warmup_s": warmup_s,
        "loop_shape": {"prompt_tokens": prompt_tokens, "response_tokens": response_tokens, "batch": batch,
                       "group": group, "max_concurrent_episodes": concurrent, "max_staleness": staleness},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny policy on CPU, short prompt and response, 2 small steps (a smoke test of this script)")
    ap.add_argument("--preset", default="bench-2b")
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps")
    ap.add_argument("--warmup", type=int, default=1, help="learner steps before timing")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="trajectories per learner step (groups of 4)")
    ap.add_argument("--concurrent", type=int, default=64, help="episodes in flight per engine")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        out = bench_loop("tiny", steps=2, warmup=1, prompt_tokens=48, response_tokens=16, batch=8, group=4,
                         concurrent=16, cpu=True)
    else:
        out = bench_loop(a.preset, a.steps, a.warmup, a.prompt_tokens, a.response_tokens, a.batch, 4, a.concurrent)
    for k, v in out.items():
        print(f"{k:30s} {v:.4g}" if isinstance(v, float) else f"{k:30s} {v}")
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
