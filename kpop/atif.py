"""Trajectories as ATIF (Agent Trajectory Interchange Format, v1.4), the JSON format of Harbor.

    doc = to_atif(traj)                     # an `AtifTrajectory`; doc.model_dump(exclude_none=True)
    export_atif("runs/demo", "out/")        # one <trajectory_id>.json per archived trajectory

Mapping (ATIF has one step per system prompt, user message or complete agent turn):
  system / user message        -> step with source "system" / "user"
  assistant message            -> step with source "agent": message, tool_calls
  following tool messages      -> that agent step's observation.results (source_call_id = tool_call_id)
  model tokens of the turn     -> metrics.completion_token_ids / logprobs, metrics.prompt_tokens
  reward, verifier detail, env -> final_metrics.extra and the root `extra`
Token runs are matched to agent turns by order (each contiguous run of loss-mask-1 tokens is one
turn); when the counts disagree (a resumed turn split across policy versions and re-merged, or a
trajectory without tokens) the per-step token metrics are left out rather than guessed.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kpop.trajectory import Trajectory

SCHEMA_VERSION = "ATIF-v1.4"
AGENT_NAME = "kpop"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AtifToolCall(_Model):
    tool_call_id: str
    function_name: str
    arguments: dict[str, Any]


class AtifObservationResult(_Model):
    source_call_id: str | None = None
    content: str | None = None


class AtifObservation(_Model):
    results: list[AtifObservationResult]


class AtifMetrics(_Model):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    extra: dict[str, Any] | None = None


class AtifStep(_Model):
    step_id: int = Field(ge=1)
    timestamp: str | None = None
    source: Literal["system", "user", "agent"]
    model_name: str | None = None
    message: str
    reasoning_content: str | None = None
    tool_calls: list[AtifToolCall] | None = None
    observation: AtifObservation | None = None
    metrics: AtifMetrics | None = None
    extra: dict[str, Any] | None = None


class AtifAgent(_Model):
    name: str
    version: str
    model_name: str | None = None
    extra: dict[str, Any] | None = None


class AtifFinalMetrics(_Model):
    total_prompt_tokens: int | None = None
    total_completion_tokens: int | None = None
    total_cached_tokens: int | None = None
    total_cost_usd: float | None = None
    total_steps: int | None = None
    extra: dict[str, Any] | None = None


class AtifTrajectory(_Model):
    schema_version: str
    session_id: str
    agent: AtifAgent
    steps: list[AtifStep]
    notes: str | None = None
    final_metrics: AtifFinalMetrics | None = None
    extra: dict[str, Any] | None = None


def _model_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _arguments(raw: Any) -> dict[str, Any]:
    # ATIF wants an object; a policy's malformed JSON is kept verbatim rather than dropped
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_raw": raw}


def _kpop_version() -> str:
    try:
        from importlib.metadata import version

        return version("kpop")
    except Exception:  # running from a source tree
        return "0.0.0+source"


def to_atif(traj: Trajectory, *, model_name: str | None = None, extra: dict[str, Any] | None = None) -> AtifTrajectory:
    """One trajectory as an ATIF document (see the module docstring for the mapping)."""
    runs = _model_runs(traj.loss_mask)
    n_agent = sum(1 for m in traj.messages if m.get("role") == "assistant")
    use_tokens = len(runs) == n_agent and n_agent > 0
    versions = {(s.start, s.end): s.version for s in traj.segments}
    stamp = datetime.fromtimestamp(traj.created_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    steps: list[AtifStep] = []
    turn = 0
    for i, msg in enumerate(traj.messages):
        role, content = msg["role"], msg.get("content") or ""
        if role == "tool":
            last = steps[-1] if steps else None
            result = AtifObservationResult(source_call_id=msg.get("tool_call_id"), content=content)
            if last is None or last.source != "agent":  # a tool message with no agent turn before it
                steps.append(AtifStep(step_id=len(steps) + 1, source="system", message="",
                                      observation=AtifObservation(results=[result]), extra={"message_index": i}))
            elif last.observation is None:
                last.observation = AtifObservation(results=[result])
            else:
                last.observation.results.append(result)
            continue
        if role in ("system", "user"):
            steps.append(AtifStep(step_id=len(steps) + 1, source=role, message=content, extra={"message_index": i}))
            continue
        calls = [AtifToolCall(tool_call_id=str(c.get("id", f"call_{i}_{j}")),
                              function_name=str((c.get("function") or {}).get("name", "")),
                              arguments=_arguments((c.get("function") or {}).get("arguments", {})))
                 for j, c in enumerate(msg.get("tool_calls") or [])]
        metrics = None
        step_extra: dict[str, Any] = {"message_index": i}
        if use_tokens:
            start, end = runs[turn]
            metrics = AtifMetrics(prompt_tokens=start, completion_tokens=end - start,
                                  completion_token_ids=traj.token_ids[start:end], logprobs=traj.logprobs[start:end])
            if (start, end) in versions:
                step_extra["policy_version"] = versions[(start, end)]
        turn += 1
        steps.append(AtifStep(step_id=len(steps) + 1, source="agent", model_name=model_name, message=content,
                              tool_calls=calls or None, metrics=metrics, extra=step_extra, timestamp=None))
    for s in steps:
        s.timestamp = stamp
    return AtifTrajectory(
        schema_version=SCHEMA_VERSION, session_id=traj.trajectory_id,
        agent=AtifAgent(name=AGENT_NAME, version=_kpop_version(), model_name=model_name),
        steps=steps,
        final_metrics=AtifFinalMetrics(
            total_prompt_tokens=sum(s.metrics.prompt_tokens or 0 for s in steps if s.metrics) if use_tokens else None,
            total_completion_tokens=traj.num_model_tokens if traj.token_ids else None,
            total_steps=len(steps),
            extra={"reward": traj.reward, "reward_detail": traj.reward_detail, "status": traj.status,
                   "error": traj.error},
        ),
        extra={"run_id": traj.run_id, "env_id": traj.env_id, "task_id": traj.task_id, "seed": traj.seed,
               "group_id": traj.group_id, "segments": [list(s) for s in traj.segments], "timings": traj.timings,
               **(extra or {})},
    )


def export_atif(run: str | Path, out: str | Path, **filters: Any) -> list[Path]:
    """Write each archived trajectory of `run` (matching `filters`) to `out/<trajectory_id>.json`."""
    from kpop.archive import TrajectoryArchive, archive_dir

    archive = TrajectoryArchive(archive_dir(run))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in archive.records(**filters):
        doc = to_atif(rec.trajectory, extra={"archive_status": rec.status, "step": rec.step,
                                             "policy_version": rec.policy_version, "staleness": rec.staleness})
        path = out / f"{rec.trajectory.trajectory_id}.json"
        path.write_text(json.dumps(doc.model_dump(mode="json", exclude_none=True), indent=1))
        written.append(path)
    return written
