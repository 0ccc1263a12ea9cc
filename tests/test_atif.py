"""`kpop export --atif`: archived real episodes as ATIF v1.4 JSON, checked against a JSON Schema
written here from the ATIF RFC (Harbor docs/rfcs/0001-trajectory-format.md), independent of
the pydantic models in kpop/atif.py."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import typer
from typer.testing import CliRunner

from kpop.archive import TrajectoryArchive
from kpop.atif import to_atif
from kpop.cli.evals import export_cmd
from kpop.policy.tokenizer import get_tokenizer
from demo_run import play, synthetic_logprobs

_OBJ = {"type": "object"}
ATIF_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "session_id", "agent", "steps"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "string", "pattern": r"^ATIF-v1\.[0-9]+$"},
        "session_id": {"type": "string", "minLength": 1},
        "agent": {"type": "object", "required": ["name", "version"], "additionalProperties": False,
                  "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                 "model_name": {"type": "string"}, "extra": _OBJ}},
        "notes": {"type": "string"},
        "extra": _OBJ,
        "final_metrics": {"type": "object", "additionalProperties": False, "properties": {
            "total_prompt_tokens": {"type": "integer"}, "total_completion_tokens": {"type": "integer"},
            "total_cached_tokens": {"type": "integer"}, "total_cost_usd": {"type": "number"},
            "total_steps": {"type": "integer"}, "extra": _OBJ}},
        "steps": {"type": "array", "items": {
            "type": "object", "required": ["step_id", "source", "message"], "additionalProperties": False,
            "properties": {
                "step_id": {"type": "integer", "minimum": 1},
                "timestamp": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
                "source": {"enum": ["system", "user", "agent"]},
                "model_name": {"type": "string"}, "reasoning_effort": {"type": ["string", "number"]},
                "message": {"type": "string"}, "reasoning_content": {"type": "string"},
                "tool_calls": {"type": "array", "items": {
                    "type": "object", "required": ["tool_call_id", "function_name", "arguments"],
                    "additionalProperties": False,
                    "properties": {"tool_call_id": {"type": "string"}, "function_name": {"type": "string"},
                                   "arguments": _OBJ}}},
                "observation": {"type": "object", "required": ["results"], "additionalProperties": False,
                                "properties": {"results": {"type": "array", "items": {
                                    "type": "object", "additionalProperties": False,
                                    "properties": {"source_call_id": {"type": ["string", "null"]},
                                                   "content": {"type": "string"},
                                                   "subagent_trajectory_ref": {"type": "array"}}}}}},
                "metrics": {"type": "object", "additionalProperties": False, "properties": {
                    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                    "cached_tokens": {"type": "integer"}, "cost_usd": {"type": "number"},
                    "prompt_token_ids": {"type": "array", "items": {"type": "integer"}},
                    "completion_token_ids": {"type": "array", "items": {"type": "integer"}},
                    "logprobs": {"type": "array", "items": {"type": "number"}}, "extra": _OBJ}},
                "extra": _OBJ}}},
    },
}


def check_atif(doc: dict) -> None:
    """The JSON Schema plus the RFC's cross-field rules."""
    jsonschema.validate(doc, ATIF_SCHEMA)
    assert [s["step_id"] for s in doc["steps"]] == list(range(1, len(doc["steps"]) + 1))
    for s in doc["steps"]:
        if s["source"] != "agent":
            assert not {"tool_calls", "metrics", "model_name", "reasoning_content"} & set(s)
        ids = {c["tool_call_id"] for c in s.get("tool_calls", [])}
        for r in (s.get("observation") or {}).get("results", []):
            assert r.get("source_call_id") is None or r["source_call_id"] in ids
        m = s.get("metrics") or {}
        if "completion_token_ids" in m:
            assert len(m["completion_token_ids"]) == len(m["logprobs"]) == m["completion_tokens"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tok, rng = get_tokenizer(), random.Random(0)
    trajs = [synthetic_logprobs(play("kpop/workflow-v0", "oracle", 1, tokenizer=tok), [2, 3], rng)[0],
             synthetic_logprobs(play("kpop/tooluse-v0", "wrong", 2, tokenizer=tok), [7], rng)[0],
             play("kpop/tooluse-v0", "oracle", 3, tokenizer=tok).model_copy(  # no tokens recorded
                 update={"token_ids": [], "logprobs": [], "loss_mask": [], "segments": []})]
    with TrajectoryArchive(run) as a:
        a.write(trajs, status="consumed", step=3, policy_version=8)
    return run


def test_export_validates_and_keeps_the_episode(run_dir, tmp_path):
    app = typer.Typer()
    app.command()(export_cmd)
    out = tmp_path / "atif"
    res = CliRunner().invoke(app, [str(run_dir), "--atif", str(out)])
    assert res.exit_code == 0 and "wrote 3 ATIF trajectories" in res.stdout, res.output
    trajs = {t.trajectory_id: t for t in TrajectoryArchive(run_dir).load()}
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(trajs)
    for path in out.glob("*.json"):
        doc = json.loads(path.read_text())
        check_atif(doc)
        t = trajs[doc["session_id"]]
        assert doc["final_metrics"]["extra"]["reward"] == t.reward
        assert doc["extra"]["env_id"] == t.env_id and doc["extra"]["archive_status"] == "consumed"
        agent = [s for s in doc["steps"] if s["source"] == "agent"]
        assert [s["message"] for s in agent] == [m.get("content") or "" for m in t.messages if m["role"] == "assistant"]
        n_tool_msgs = sum(m["role"] == "tool" for m in t.messages)
        assert sum(len(s.get("observation", {}).get("results", [])) for s in agent) == n_tool_msgs
        if t.token_ids:  # every model token lands in exactly one agent step, with its logprob
            ids = [i for s in agent for i in s["metrics"]["completion_token_ids"]]
            assert ids == [i for i, m in zip(t.token_ids, t.loss_mask) if m]
            assert doc["final_metrics"]["total_completion_tokens"] == t.num_model_tokens
        else:
            assert all("metrics" not in s for s in agent)


def test_workflow_tool_calls_map_to_observations(run_dir):
    t = TrajectoryArchive(run_dir).load(env_id="kpop/workflow-v0")[0]
    doc = to_atif(t).model_dump(mode="json", exclude_none=True)
    check_atif(doc)
    first = next(s for s in doc["steps"] if s["source"] == "agent")
    assert first["tool_calls"][0]["function_name"] == "get_ticket"
    assert isinstance(first["tool_calls"][0]["arguments"], dict)
    assert first["observation"]["results"][0]["source_call_id"] == first["tool_calls"][0]["tool_call_id"]
    assert first["extra"]["policy_version"] == 2
    assert doc["steps"][0]["source"] == "system" and doc["steps"][1]["source"] == "user"


def test_schema_check_rejects_broken_documents(run_dir):
    doc = to_atif(TrajectoryArchive(run_dir).load(limit=1)[0]).model_dump(mode="json", exclude_none=True)
    bad = json.loads(json.dumps(doc))
    bad["steps"][0]["source"] = "assistant"
    with pytest.raises(jsonschema.ValidationError):
        check_atif(bad)
    bad = json.loads(json.dumps(doc))
    del bad["agent"]["version"]
    with pytest.raises(jsonschema.ValidationError):
        check_atif(bad)
