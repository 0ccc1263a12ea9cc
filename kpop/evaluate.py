"""`kpop eval`: a checkpoint's mean reward and pass@k on an environment.

    report = evaluate("runs/demo/policy", "kpop/tooluse-v0", episodes=32, samples=4)
    report.mean_reward, report.pass_at_k        # {"1": ..., "2": ..., "4": ...}
    print(format_settings(report))              # which settings were used, and where they came from
    write_report(report, out_dir)               # eval-<env>.json + eval-<env>.md

A checkpoint inside a run directory is evaluated with that run's settings: the env kwargs of its
`environments.eval` (else `environments.train`) entry for the env, its `rollout` section (engine,
sampling, max_new_tokens, max_turns, max_episode_tokens), its step timeout, sandbox pool and
policy dtype, read from the `config.yaml` next to or above the checkpoint. Each argument given
explicitly overrides the run's value (env kwargs key by key). Without a run config, the
defaults of `RolloutConfig` apply.

Task i is the env's task for seed `seed + i`; each is played `samples` times (sampling seeds
differ per sample) by a `RolloutWorker` (the rollout's own episode loop), all concurrently so the
engine batches them. An episode "passes" when its reward is >= `pass_threshold`. pass@k is the
unbiased estimator of Chen et al. (2021): `1 - C(n - c, k) / C(n, k)` per task (n samples, c
passing), averaged over tasks.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from kpop.config import ConfigError, PolicyConfig, RolloutConfig, RunConfig, load_config

EngineKind = Literal["embedded", "vllm"]
RUN_CONFIG_DEPTH = 3  # checkpoint dirs sit at most runs/<name>/checkpoints/<step>/policy deep


class EpisodeResult(BaseModel):
    task_id: str
    seed: int
    sample: int
    reward: float
    status: str
    turns: int
    tokens: int  # the whole episode: prompt, tool results and model tokens
    model_tokens: int
    error: str | None = None


class EvalSettings(BaseModel):
    """What an evaluation ran with, and where each part came from."""

    source: str  # the run config.yaml read, or "defaults"
    env_kwargs: dict[str, Any]
    rollout: RolloutConfig
    step_timeout_s: float | None
    overridden: list[str] = Field(default_factory=list)  # names given explicitly


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
    truncated: int  # episodes cut (token budget or turn cap): reward 0, not graded
    sampling: dict[str, Any]
    settings_source: str
    overridden: list[str] = Field(default_factory=list)
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


def find_run_config(ckpt: Path) -> Path | None:
    """The `config.yaml` of the run holding `ckpt`: in it or up to RUN_CONFIG_DEPTH levels above."""
    for d in [ckpt, *list(ckpt.resolve().parents)[:RUN_CONFIG_DEPTH]]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def resolve_settings(run: RunConfig | None, source: str, env_id: str, env_kwargs: dict[str, Any] | None,
                     overrides: dict[str, Any]) -> EvalSettings:
    """The run's settings for `env_id`, with `env_kwargs` (key by key) and `overrides` (rollout
    fields: engine, temperature, max_new_tokens, max_turns, max_episode_tokens; None = keep) on top."""
    base: dict[str, Any] = {}
    rollout = RolloutConfig()
    step_timeout_s = None
    if run is not None:
        specs = [s for s in [*run.environments.eval, *run.environments.train] if s.id == env_id]
        base = dict(specs[0].kwargs) if specs else {}
        rollout, step_timeout_s = run.rollout, run.environments.step_timeout_s
        if not specs:
            source += f" (which does not train or evaluate {env_id}: its env kwargs do not apply)"
    given = {k: v for k, v in overrides.items() if v is not None}
    rollout = RolloutConfig.model_validate({**rollout.model_dump(), **given})
    if rollout.max_new_tokens > rollout.max_episode_tokens:
        raise ValueError(f"max_new_tokens ({rollout.max_new_tokens}) exceeds max_episode_tokens "
                         f"({rollout.max_episode_tokens})")
    overridden = sorted(given) + [f"env kwarg {k}" for k in sorted(env_kwargs or {})]
    return EvalSettings(source=source, env_kwargs={**base, **(env_kwargs or {})}, rollout=rollout,
                        step_timeout_s=step_timeout_s, overridden=overridden)


def _policy_config(ckpt: Path, run: RunConfig | None) -> PolicyConfig:
    tokenizer = next((d for d in (ckpt, ckpt.parent) if (d / "tokenizer.json").is_file()), None)
    if tokenizer is None and run is not None:
        tokenizer = run.policy.tokenizer  # None: the local BPE tokenizer, as the run trained with
    dtype = run.policy.dtype if run is not None else "float32"
    return PolicyConfig(checkpoint=ckpt, tokenizer=tokenizer, dtype=dtype,
                        fp32_lm_head=run.policy.fp32_lm_head if run is not None else True)


def evaluate(checkpoint: str | Path, env_id: str, episodes: int, *, samples: int = 1, seed: int = 10_000,
             pass_threshold: float = 1.0, env_kwargs: dict[str, Any] | None = None,
             engine: EngineKind | None = None, temperature: float | None = None, max_new_tokens: int | None = None,
             max_turns: int | None = None, max_episode_tokens: int | None = None,
             run_config: str | Path | None | Literal[False] = None) -> EvalReport:
    """Play `episodes` tasks x `samples` samples with the checkpoint's policy (see the module
    docstring). `run_config`: None = found next to / above the checkpoint, False = ignore it."""
    from environments.registry import is_registered, list_envs
    from kpop.rollout.worker import RolloutTask, RolloutWorker, truncation_stats

    if episodes < 1 or samples < 1:
        raise ValueError(f"episodes and samples must be >= 1, got {episodes} and {samples}")
    if not is_registered(env_id):
        raise ValueError(f"unknown environment {env_id!r}; known: {', '.join(list_envs())}")
    ckpt = checkpoint_dir(checkpoint)
    cfg_path = find_run_config(ckpt) if run_config is None else (Path(run_config) if run_config else None)
    try:
        run = load_config(cfg_path) if cfg_path is not None else None
    except ConfigError as exc:
        raise ValueError(f"{exc}\n(the run config of {ckpt}; pass --no-run-config to ignore it)") from None
    settings = resolve_settings(run, str(cfg_path) if cfg_path else "defaults", env_id, env_kwargs,
                                dict(engine=engine, temperature=temperature, max_new_tokens=max_new_tokens,
                                     max_turns=max_turns, max_episode_tokens=max_episode_tokens))
    if settings.rollout.engine == "vllm":
        from kpop.policy.checkpoint import load_config as load_policy_config
        from kpop.rollout.vllm_engine import check_vllm_arch

        check_vllm_arch(load_policy_config(ckpt))  # before loading any weights
    tasks = [RolloutTask(env_id=env_id, seed=s, group_id=f"eval-{s}", env_kwargs=settings.env_kwargs,
                         sample_seed=seed + 1000 * j + s) for s in range(seed, seed + episodes) for j in range(samples)]
    t0 = time.perf_counter()
    worker = RolloutWorker(_policy_config(ckpt, run), settings.rollout, None, run_id="eval",
                           step_timeout_s=settings.step_timeout_s, sandbox=run.sandbox if run is not None else None)
    try:
        trajs = asyncio.run(worker.play(tasks))
    finally:
        worker.close()
    results = [EpisodeResult(task_id=t.task_id, seed=t.seed, sample=i % samples, reward=t.reward, status=t.status,
                             turns=sum(m["role"] == "assistant" for m in t.messages), tokens=t.num_tokens,
                             model_tokens=t.num_model_tokens, error=t.error) for i, t in enumerate(trajs)]
    truncation_stats(trajs, settings.rollout.max_episode_tokens)
    by_task: dict[int, list[EpisodeResult]] = {}
    for r in results:
        by_task.setdefault(r.seed, []).append(r)
    ks = sorted({1, samples} | {k for k in (2, 4, 8, 16, 32) if k < samples})
    passk = {str(k): sum(pass_at_k(samples, sum(x.reward >= pass_threshold for x in rs), k)
                         for rs in by_task.values()) / len(by_task) for k in ks}
    r = settings.rollout
    return EvalReport(checkpoint=str(ckpt), env_id=env_id, env_kwargs=settings.env_kwargs, engine=r.engine,
                      tasks=episodes, samples=samples, episodes=len(results),
                      mean_reward=sum(x.reward for x in results) / len(results), pass_threshold=pass_threshold,
                      pass_at_k=passk, failed=sum(x.status == "failed" for x in results),
                      truncated=sum(t.status == "truncated" for t in trajs),
                      sampling={"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "seed": seed,
                                "max_new_tokens": r.max_new_tokens, "max_turns": r.max_turns,
                                "max_episode_tokens": r.max_episode_tokens},
                      settings_source=settings.source, overridden=settings.overridden,
                      wall_s=time.perf_counter() - t0, results=results)


def format_settings(report: EvalReport) -> str:
    """One line: the settings an evaluation used and where they came from."""
    given = f"; from the command line: {', '.join(report.overridden)}" if report.overridden else ""
    return (f"settings: {report.settings_source}{given}\n  env {report.env_id} kwargs {json.dumps(report.env_kwargs)}; "
            f"engine {report.engine}; {json.dumps(report.sampling)}")


def format_markdown(report: EvalReport) -> str:
    lines = [f"# Eval of `{report.checkpoint}` on `{report.env_id}`", "",
             f"- engine: {report.engine}; {report.tasks} tasks x {report.samples} samples = {report.episodes} episodes",
             f"- mean reward: **{report.mean_reward:.4f}**",
             *(f"- pass@{k} (reward >= {report.pass_threshold:g}): **{v:.4f}**" for k, v in report.pass_at_k.items()),
             f"- failed episodes: {report.failed}; truncated (reward 0, not graded): {report.truncated}",
             f"- env kwargs: `{json.dumps(report.env_kwargs)}`", f"- sampling: `{json.dumps(report.sampling)}`",
             f"- settings from: {report.settings_source}"
             + (f" (command line: {', '.join(report.overridden)})" if report.overridden else ""),
             f"- wall time: {report.wall_s:.1f} s", "",
             "| task | sample | reward | status | turns | tokens | model tokens |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.task_id} | {r.sample} | {r.reward:.3f} | {r.status} | {r.turns} | {r.tokens} | {r.model_tokens} |"
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
