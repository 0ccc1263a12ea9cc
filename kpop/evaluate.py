"""`kpop eval`: a checkpoint's mean reward and pass@k on an environment.

    report = evaluate("runs/demo/checkpoints/40", "kpop/tooluse-v0", episodes=32, samples=4)
    report.mean_reward, report.pass_at_k        # {"1": ..., "2": ..., "4": ...}
    write_report(report, out_dir)               # eval-<env>.json + eval-<env>.md

Task i is the env's task for seed `seed + i`; each is played `samples` times (sampling seeds
differ per sample) through the rollout engine's chat surface (`ChatSession`), all episodes
concurrently so the engine batches them. An episode "passes" when its reward is >=
`pass_threshold`. pass@k is the unbiased estimator of Chen et al. (2021):
`1 - C(n - c, k) / C(n, k)` per task (n samples, c passing), averaged over tasks.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

EngineKind = Literal["embedded", "vllm"]


class EpisodeResult(BaseModel):
    task_id: str
    seed: int
    sample: int
    reward: float
    status: str
    turns: int
    model_tokens: int
    error: str | None = None


class EvalReport(BaseModel):
    checkpoint: str
    env_id: str
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    engine: str
    tasks: int
    samples: int
    episodes: int
    mean_reward: float
    pass_threshold: float
    pass_at_k: dict[str, float]  # k (as a string, JSON keys) -> estimate
    failed: int  # episodes with status "failed" (env or engine errors, not wrong answers)
    sampling: dict[str, Any]
    wall_s: float
    results: list[EpisodeResult]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n with c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def checkpoint_dir(path: str | Path) -> Path:
    """The HF policy directory: `path` itself, or its one subdirectory holding a config.json."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    inner = [d for d in path.iterdir() if (d / "config.json").is_file()] if path.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    raise FileNotFoundError(f"{path}: not a policy checkpoint (no config.json in it or in exactly one subdirectory)")


def _tokenizer(ckpt: Path) -> Any:
    from kpop.policy.tokenizer import get_tokenizer, load_tokenizer

    for d in (ckpt, ckpt.parent):
        if (d / "tokenizer.json").is_file():
            return load_tokenizer(d)
    return get_tokenizer()  # checkpoints trained with the local BPE tokenizer may not carry it


def make_engine(kind: EngineKind, ckpt: Path, tokenizer: Any) -> Any:
    if kind == "embedded":
        from kpop.policy.checkpoint import load_checkpoint
        from kpop.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(load_checkpoint(ckpt), tokenizer)
    if kind == "vllm":
        try:
            from kpop.rollout.vllm_engine import VllmEngine  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RuntimeError(f"--engine vllm is not available here ({exc}); use --engine embedded") from None
        return VllmEngine(str(ckpt), tokenizer=tokenizer)
    raise ValueError(f"engine must be 'embedded' or 'vllm', got {kind!r}")


async def _episodes(client: Any, env_id: str, env_kwargs: dict[str, Any], seeds: list[int], samples: int,
                    sampling: dict[str, Any], max_turns: int | None, max_episode_tokens: int | None,
                    concurrency: int) -> list[EpisodeResult]:
    from environments import make, run_episode
    from kpop.rollout.chat import ChatSession

    sem = asyncio.Semaphore(concurrency)

    async def one(seed: int, sample: int) -> EpisodeResult:
        async with sem:
            session = ChatSession(client, max_total_tokens=max_episode_tokens,
                                  **{**sampling, "seed": sampling.get("seed", 0) + 1000 * sample + seed})
            env = make(env_id, **env_kwargs)
            try:
                ep = await run_episode(env, session, seed=seed, max_turns=max_turns)
            finally:
                env.close()
            return EpisodeResult(task_id=ep.task_id or f"{env_id}#{seed}", seed=seed, sample=sample,
                                 reward=ep.reward, status=ep.status, turns=ep.turns,
                                 model_tokens=sum(session.trace.loss_mask), error=ep.error)

    return list(await asyncio.gather(*(one(s, j) for s in seeds for j in range(samples))))


def evaluate(checkpoint: str | Path, env_id: str, episodes: int, *, samples: int = 1, engine: EngineKind = "embedded",
             env_kwargs: dict[str, Any] | None = None, seed: int = 10_000, temperature: float = 1.0,
             max_new_tokens: int = 128, max_turns: int | None = 8, max_episode_tokens: int | None = 2048,
             pass_threshold: float = 1.0, concurrency: int = 16) -> EvalReport:
    """Play `episodes` tasks x `samples` samples with the checkpoint's policy (see the module docstring)."""
    from environments.registry import is_registered, list_envs
    from kpop.rollout.chat import ChatClient

    if episodes < 1 or samples < 1:
        raise ValueError(f"episodes and samples must be >= 1, got {episodes} and {samples}")
    if not is_registered(env_id):
        raise ValueError(f"unknown environment {env_id!r}; known: {', '.join(list_envs())}")
    ckpt = checkpoint_dir(checkpoint)
    tokenizer = _tokenizer(ckpt)
    sampling = {"temperature": temperature, "max_tokens": max_new_tokens, "seed": seed}
    t0 = time.perf_counter()
    eng = make_engine(engine, ckpt, tokenizer)
    try:
        client = ChatClient(eng, tokenizer)
        results = asyncio.run(_episodes(client, env_id, env_kwargs or {}, list(range(seed, seed + episodes)), samples,
                                        sampling, max_turns, max_episode_tokens, concurrency))
    finally:
        eng.close()
    by_task: dict[int, list[EpisodeResult]] = {}
    for r in results:
        by_task.setdefault(r.seed, []).append(r)
    ks = sorted({1, samples} | {k for k in (2, 4, 8, 16, 32) if k < samples})
    passk = {str(k): sum(pass_at_k(samples, sum(x.reward >= pass_threshold for x in rs), k)
                         for rs in by_task.values()) / len(by_task) for k in ks}
    return EvalReport(checkpoint=str(ckpt), env_id=env_id, env_kwargs=env_kwargs or {}, engine=engine,
                      tasks=episodes, samples=samples, episodes=len(results),
                      mean_reward=sum(r.reward for r in results) / len(results), pass_threshold=pass_threshold,
                      pass_at_k=passk, failed=sum(r.status == "failed" for r in results),
                      sampling={**sampling, "max_turns": max_turns, "max_episode_tokens": max_episode_tokens},
                      wall_s=time.perf_counter() - t0, results=results)


def format_markdown(report: EvalReport) -> str:
    lines = [f"# Eval of `{report.checkpoint}` on `{report.env_id}`", "",
             f"- engine: {report.engine}; {report.tasks} tasks x {report.samples} samples = {report.episodes} episodes",
             f"- mean reward: **{report.mean_reward:.4f}**",
             *(f"- pass@{k} (reward >= {report.pass_threshold:g}): **{v:.4f}**" for k, v in report.pass_at_k.items()),
             f"- failed episodes: {report.failed}", f"- sampling: `{json.dumps(report.sampling)}`",
             f"- wall time: {report.wall_s:.1f} s", "", "| task | sample | reward | status | turns | model tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.task_id} | {r.sample} | {r.reward:.3f} | {r.status} | {r.turns} | {r.model_tokens} |"
              for r in report.results]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write eval-<env>.json and eval-<env>.md into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "eval-" + report.env_id.replace("/", "_")
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(report.model_dump_json(indent=1))
    md.write_text(format_markdown(report))
    return js, md
