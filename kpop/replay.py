"""Replay stored trajectories against fresh environments and re-grade them.

    report = replay_path("runs/demo")                  # a run directory or its trajectories/ archive
    report.match_rate                                  # 1.0 for deterministic environments
    [r.divergence for r in report.results if not r.match]

Each trajectory's recorded assistant messages are played, in order, by a scripted agent through
`environments.run_episode` on a freshly made env (same env id, `reset(seed, options={"task_id"})`).
The replayed conversation is then compared message by message with the recorded one: the first
difference names the step (0 = the reset observation, k = the env's answer to the k-th assistant
turn). A trajectory matches when every observation and the reward agree.

`rescore_path` (`kpop replay RUN --rescore --kpop-phi 0.01 --icepop 0.5,2.0`) runs no environment:
it re-applies KPop's binary-KL mask or IcePop's ratio window, under settings other than the run's,
to the archived logprobs (the rollout's and the learner's own, `train_logprobs`) of every loss
token, and counts the tokens each setting would mask; no model is needed.

`regrade_only=True` skips the observation comparison and only checks the reward. The env API has
no verifier-only entry point and some verifiers read state that tools built (the workflow
database), so the final state is rebuilt by replaying the actions, then the verifier runs.

An archive is untrusted input: anyone who can write a parquet file can write any `env_kwargs`,
and any logprob. Rescoring skips (and names) a row whose per-token fields do not fit its tokens or
hold values that are not log probabilities; the other rows are still scored.
Replay passes on only the archived kwargs that `safe_env_kwargs` allows: ones the env's
constructor declares, with a plain scalar value, that neither configure the sandbox (`image`,
`limits`, `network`, `mounts`, ...) nor name a host path (`*_dir`, `*_path`, `*_file`). The rest are
left out and listed in the result (`refused_kwargs`). The recorded docker image is not used
either. `trust_archive=True` (`kpop replay --trust-archive`) passes everything, for archives
you wrote yourself. Kwargs the caller passes (`env_kwargs=`) are the caller's: always used.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, Field

from environments import make, run_episode
from environments.core import Message
from environments.tools import in_thread
from environments.registry import constructor_params, is_registered
from kpop.archive import TrajectoryArchive, archive_dir
from kpop.trajectory import Trajectory

REWARD_TOL = 1e-6
# Constructor kwargs that would change what a sandbox may do or see: never taken from an archive.
SANDBOX_KWARGS = frozenset({"image", "limits", "network", "mounts", "binds", "volumes", "rootfs", "sandbox",
                            "privileged", "env", "environment", "user", "cap_add", "devices"})
_PATH_SUFFIXES = ("_dir", "_path", "_file", "_root")
_SCALARS = (type(None), bool, int, float, str)


class Divergence(BaseModel):
    step: int  # 0: reset observation; k: the env's answer to assistant turn k
    message_index: int
    recorded: Message | None
    replayed: Message | None


class ReplayResult(BaseModel):
    trajectory_id: str
    env_id: str
    task_id: str
    recorded_reward: float
    replayed_reward: float
    recorded_status: str
    replayed_status: str
    match: bool
    divergence: Divergence | None = None  # first differing observation (full replay only)
    error: str | None = None  # why the replay could not run or the replayed episode failed
    replayed_detail: dict[str, Any] = Field(default_factory=dict)
    refused_kwargs: dict[str, str] = Field(default_factory=dict)  # archived env kwarg -> why it was not used


class ReplayReport(BaseModel):
    mode: str  # "replay" | "regrade"
    total: int
    matched: int
    match_rate: float  # 0.0 when there is nothing to replay: no trajectories is not a perfect score
    results: list[ReplayResult]
    skipped_parts: dict[str, str] = Field(default_factory=dict)  # unreadable archive part -> why


class _Exhausted(RuntimeError):
    pass


class _RecordedActions:
    """An agent that answers with the recorded assistant messages, in order."""

    def __init__(self, messages: list[Message]) -> None:
        self.actions = [m for m in messages if m.get("role") == "assistant"]
        self.turn = 0

    async def __call__(self, messages: list[Message], tools: list[dict[str, Any]]) -> Message:
        if self.turn >= len(self.actions):
            # the recorded episode ended here (runner cap or an agent failure); the env wants more
            raise _Exhausted(f"the recording has only {len(self.actions)} assistant turns")
        self.turn += 1
        return json.loads(json.dumps(self.actions[self.turn - 1]))


def safe_env_kwargs(env_id: str, archived: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split archived env kwargs into (the ones replay may use, {refused name: why})."""
    try:
        params, _ = constructor_params(env_id)
    except KeyError:
        params = {}
    safe: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for name, value in archived.items():
        if name not in params:
            refused[name] = f"{env_id} does not declare this kwarg"
        elif name in SANDBOX_KWARGS:
            refused[name] = "it configures the sandbox"
        elif name.endswith(_PATH_SUFFIXES):
            refused[name] = "it names a host path"
        elif not isinstance(value, _SCALARS):
            refused[name] = f"a structured value ({type(value).__name__}) could carry sandbox settings"
        else:
            safe[name] = value
    return safe, refused


def replay_env_kwargs(traj: Trajectory, env_kwargs: dict[str, Any] | None = None, *,
                      trust_archive: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """The constructor kwargs a replay of `traj` uses, and the archived ones it refused."""
    archived, refused = (dict(traj.env_kwargs), {}) if trust_archive else safe_env_kwargs(traj.env_id, traj.env_kwargs)
    kwargs = {**archived, **(env_kwargs or {})}  # the caller's kwargs override the recording's
    # a fresh sandbox of the recording's kind, if the env takes a `backend`: both kinds are sandboxes
    if traj.sandbox is not None and traj.sandbox.backend in ("bwrap", "docker") and is_registered(traj.env_id):
        params, _ = constructor_params(traj.env_id)
        if "backend" in params:
            kwargs.setdefault("backend", traj.sandbox.backend)
        if "image" in params and traj.sandbox.backend == "docker" and traj.sandbox.image:
            if trust_archive:
                kwargs.setdefault("image", traj.sandbox.image)
            elif "image" not in kwargs:
                refused["sandbox.image"] = f"the recorded docker image {traj.sandbox.image!r} is archive data"
    return kwargs, {k: v for k, v in refused.items() if k not in (env_kwargs or {})}


def _canon(msg: Message | None) -> str:
    return json.dumps(msg, sort_keys=True, default=str)


def first_divergence(recorded: list[Message], replayed: list[Message]) -> Divergence | None:
    """The first message where the two conversations differ, or None if they are identical."""
    for i in range(max(len(recorded), len(replayed))):
        a = recorded[i] if i < len(recorded) else None
        b = replayed[i] if i < len(replayed) else None
        if _canon(a) != _canon(b):
            step = sum(1 for m in recorded[:i] if m.get("role") == "assistant")
            return Divergence(step=step, message_index=i, recorded=a, replayed=b)
    return None


async def areplay_one(traj: Trajectory, *, regrade_only: bool = False, env_kwargs: dict[str, Any] | None = None,
                      step_timeout_s: float | None = None, trust_archive: bool = False) -> ReplayResult:
    base: dict[str, Any] = dict(trajectory_id=traj.trajectory_id, env_id=traj.env_id, task_id=traj.task_id,
                                recorded_reward=traj.reward, recorded_status=str(traj.status))
    try:
        kwargs, base["refused_kwargs"] = replay_env_kwargs(traj, env_kwargs, trust_archive=trust_archive)
        env = make(traj.env_id, **kwargs)
    except Exception as exc:  # an env that cannot be made any more is a failed replay, not a crash
        return ReplayResult(**base, replayed_reward=0.0, replayed_status="failed", match=False,
                            error=f"cannot make env {traj.env_id!r}: {type(exc).__name__}: {exc}")
    try:
        agent = _RecordedActions(traj.messages)
        ep = await run_episode(env, agent, seed=traj.seed, options={"task_id": traj.task_id},
                               step_timeout_s=step_timeout_s)
    finally:
        close = getattr(env, "close", None)
        if close is not None:
            await in_thread(close)  # an env's close may wait on its tools: never on the event loop
    reward_ok = math.isclose(ep.reward, traj.reward, rel_tol=0.0, abs_tol=REWARD_TOL)
    divergence = None if regrade_only else first_divergence(traj.messages, ep.messages)
    return ReplayResult(**base, replayed_reward=ep.reward, replayed_status=str(ep.status),
                        match=reward_ok and divergence is None, divergence=divergence, error=ep.error,
                        replayed_detail=ep.reward_detail)


async def areplay(trajectories: Iterable[Trajectory], *, regrade_only: bool = False,
                  env_kwargs: dict[str, dict[str, Any]] | None = None, concurrency: int = 4,
                  step_timeout_s: float | None = None, trust_archive: bool = False) -> ReplayReport:
    """Replay many trajectories (`concurrency` at a time); `env_kwargs` maps env id -> constructor kwargs."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    trajs = list(trajectories)
    sem = asyncio.Semaphore(concurrency)

    async def one(t: Trajectory) -> ReplayResult:
        async with sem:
            return await areplay_one(t, regrade_only=regrade_only, env_kwargs=(env_kwargs or {}).get(t.env_id),
                                     step_timeout_s=step_timeout_s, trust_archive=trust_archive)

    results = list(await asyncio.gather(*(one(t) for t in trajs)))
    matched = sum(r.match for r in results)
    return ReplayReport(mode="regrade" if regrade_only else "replay", total=len(results), matched=matched,
                        match_rate=matched / len(results) if results else 0.0, results=results)


def replay(trajectories: Iterable[Trajectory], **kwargs: Any) -> ReplayReport:
    return asyncio.run(areplay(trajectories, **kwargs))


def replay_path(path: str | Path, *, regrade_only: bool = False, trust_archive: bool = False,
                **filters: Any) -> ReplayReport:
    """Replay the archive of a run directory (or an archive folder); `filters` as in `TrajectoryArchive.index`.
    Unreadable parts are skipped and listed in `skipped_parts`."""
    archive = TrajectoryArchive(archive_dir(path))
    trajs = archive.load(**filters)
    report = replay(trajs, regrade_only=regrade_only, trust_archive=trust_archive)
    return report.model_copy(update={"skipped_parts": dict(archive.skipped)})


def format_report(report: ReplayReport) -> str:
    lines = [f"{report.mode}: {report.matched}/{report.total} match (match_rate {report.match_rate:.3f})"]
    for part, why in report.skipped_parts.items():
        lines.append(f"skipped unreadable archive part {part}: {why}")
    refused = sorted({k for r in report.results for k in r.refused_kwargs})
    if refused:
        n = sum(bool(r.refused_kwargs) for r in report.results)
        lines.append(f"note: {n} trajectories had archived env kwargs that were not used ({', '.join(refused)}): "
                     "an archive is untrusted input; pass --trust-archive to use them")
    for r in report.results:
        mark = "ok  " if r.match else "DIFF"
        line = (f"{mark} {r.trajectory_id[:8]} {r.env_id} {r.task_id}: recorded {r.recorded_reward:g}, "
                f"replayed {r.replayed_reward:g}")
        if r.divergence is not None:
            d = r.divergence
            line += f"; diverged at step {d.step} (message {d.message_index})"
        if not r.match and r.error:
            line += f"; {r.error}"
        lines.append(line)
    return "\n".join(lines)


# -- rescoring the archived mismatch under other correction settings ----------------------------

LOGPROB_SLACK = 1e-3  # fp rounding can leave a logprob a hair above 0; more is not a log probability


class RescoreSetting(BaseModel):
    correction: str  # "kpop" | "icepop"
    kpop_phi: float | None = None
    icepop_alpha: float | None = None
    icepop_beta: float | None = None
    masked: int  # loss tokens this setting would mask
    mask_rate: float  # masked / the report's loss tokens

    @property
    def label(self) -> str:
        if self.correction == "kpop":
            return f"kpop phi={self.kpop_phi:g}"
        return f"icepop [{self.icepop_alpha:g}, {self.icepop_beta:g}]"


class RescoreReport(BaseModel):
    trajectories: int  # rows scored: those with the learner's logprobs and at least one loss token
    tokens: int  # their loss tokens
    without_train_logprobs: int  # matching rows the learner never scored (dropped, failed, older archives)
    archived: dict[str, int] = Field(default_factory=dict)  # TokenDecision name -> loss tokens, as the run decided
    settings: list[RescoreSetting]
    skipped: list[str] = Field(default_factory=list)  # malformed rows: where and why
    skipped_parts: dict[str, str] = Field(default_factory=dict)  # unreadable archive part -> why


def parse_icepop(text: str) -> tuple[float, float]:
    """'ALPHA,BETA' -> (alpha, beta), 0 <= alpha < beta, both finite."""
    try:
        alpha, beta = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"an IcePop window is ALPHA,BETA (e.g. 0.5,2.0), got {text!r}") from None
    if not (math.isfinite(alpha) and math.isfinite(beta) and 0 <= alpha < beta):
        raise ValueError(f"an IcePop window needs finite 0 <= ALPHA < BETA, got {text!r}")
    return alpha, beta


def _bad_logprobs(values: list, mask: list[int], name: str) -> str | None:
    for t, (v, m) in enumerate(zip(values, mask)):
        if m and (v is None or not math.isfinite(v) or v > LOGPROB_SLACK):
            return f"{name}[{t}] = {v!r} is not a log probability"
    return None


def rescore_path(path: str | Path, kpop_phis: Iterable[float] = (), icepop_windows: Iterable[tuple[float, float]] = (),
                 **filters: Any) -> RescoreReport:
    """How many loss tokens of the archive (a run directory or its trajectories/) each setting would
    mask; `filters` as in `TrajectoryArchive.index`."""
    import torch

    from kpop.algo.losses import TokenDecision, icepop_keep, kpop_keep

    kpop_phis, icepop_windows = list(kpop_phis), list(icepop_windows)
    if not kpop_phis and not icepop_windows:
        raise ValueError("rescoring needs at least one setting: a KPop phi or an IcePop window")
    for phi in kpop_phis:
        if not (math.isfinite(phi) and phi > 0):
            raise ValueError(f"a KPop phi must be a finite number > 0, got {phi!r}")
    for alpha, beta in icepop_windows:
        if not (math.isfinite(alpha) and math.isfinite(beta) and 0 <= alpha < beta):
            raise ValueError(f"an IcePop window needs finite 0 <= alpha < beta, got ({alpha!r}, {beta!r})")
    archive = TrajectoryArchive(archive_dir(path))
    skipped: list[str] = []
    records = archive.records(errors=skipped, **filters)
    train, behav = [], []
    archived: dict[str, int] = {}
    scored = unscored = 0
    for rec in records:
        t = rec.trajectory
        if rec.train_logprobs is None:
            unscored += 1
            continue
        where = f"{rec.part}: trajectory {t.trajectory_id!r}"
        bad = (_bad_logprobs(rec.train_logprobs, t.loss_mask, "train_logprobs")
               or _bad_logprobs(t.logprobs, t.loss_mask, "logprobs"))
        if bad:
            skipped.append(f"{where}: {bad}")
            continue
        idx = [i for i, m in enumerate(t.loss_mask) if m]
        if not idx:
            continue
        scored += 1
        train += [rec.train_logprobs[i] for i in idx]
        behav += [t.logprobs[i] for i in idx]
        for i in idx if rec.decisions is not None else ():
            name = TokenDecision(rec.decisions[i]).name
            archived[name] = archived.get(name, 0) + 1
    p, q = torch.tensor(train, dtype=torch.float64), torch.tensor(behav, dtype=torch.float64)
    n = len(train)

    def setting(keep: torch.Tensor, **what: Any) -> RescoreSetting:
        masked = int((~keep).sum())
        return RescoreSetting(**what, masked=masked, mask_rate=masked / n if n else 0.0)

    settings = [setting(kpop_keep(p, q, phi), correction="kpop", kpop_phi=phi) for phi in kpop_phis]
    settings += [setting(icepop_keep(p, q, a, b), correction="icepop", icepop_alpha=a, icepop_beta=b)
                 for a, b in icepop_windows]
    return RescoreReport(trajectories=scored, tokens=n, without_train_logprobs=unscored, archived=archived,
                         settings=settings, skipped=skipped, skipped_parts=dict(archive.skipped))


def format_rescore(report: RescoreReport) -> str:
    lines = [f"rescored {report.tokens} loss tokens of {report.trajectories} trajectories "
             f"({report.without_train_logprobs} more have no learner logprobs)"]
    if report.archived:
        masked = sum(v for k, v in report.archived.items() if k.startswith("MASK"))
        detail = ", ".join(f"{k} {v}" for k, v in sorted(report.archived.items()))
        lines.append(f"as the run decided: {masked} masked ({detail})")
    for s in report.settings:
        lines.append(f"{s.label:>28}: would mask {s.masked} ({s.mask_rate:.4%})")
    for part, why in report.skipped_parts.items():
        lines.append(f"skipped unreadable archive part {part}: {why}")
    for why in report.skipped:
        lines.append(f"skipped malformed row: {why}")
    return "\n".join(lines)
