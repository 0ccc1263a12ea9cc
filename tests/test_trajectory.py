"""Trajectory schema and msgpack codec: round trips, validation, version handling."""

from __future__ import annotations

import struct
from array import array

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from kpop import trajectory as T
from kpop.trajectory import (
    SCHEMA_VERSION,
    FutureSchemaWarning,
    SandboxIdentity,
    Segment,
    Trajectory,
    TrajectoryDecodeError,
    decode,
    encode,
)


def make(n: int = 6, **kw) -> Trajectory:
    base = dict(
        run_id="run-1",
        task_id="task-7",
        env_id="kpop/Coding-v0",
        seed=11,
        messages=[
            {"role": "system", "content": "You are a coder."},
            {"role": "user", "content": "Fix the bug — ünïcödé ✓ 修复"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "run", "arguments": '{"cmd": "ls"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "a.py\n"},
            {"role": "assistant", "content": "done 🎉"},
        ],
        token_ids=list(range(100, 100 + n)),
        logprobs=[0.0, 0.0, -0.25, -1.5, 0.0, -0.125][:n] + [-0.5] * max(0, n - 6),
        loss_mask=[0, 0, 1, 1, 0, 1][:n] + [1] * max(0, n - 6),
        segments=[(2, 4, 3), (5, n, 4)] if n >= 6 else [],
        reward=1.0,
        reward_detail={"tests_passed": 3, "tests_total": 3, "note": "ok ✓"},
        timings={"env_s": 0.5, "gen_s": 1.25, "wall_s": 2.0},
        sandbox=SandboxIdentity(backend="bwrap", image="debian-bookworm", digest="sha256:abc"),
    )
    base.update(kw)
    return Trajectory(**base)


def test_round_trip_full():
    traj = make()
    out = decode(encode(traj))
    assert out == traj
    assert out.segments[0] == Segment(2, 4, 3)
    assert out.messages[2]["tool_calls"][0]["function"]["name"] == "run"
    assert out.messages[1]["content"].endswith("修复")


def test_round_trip_empty():
    traj = Trajectory(run_id="r", task_id="t", env_id="e")
    out = decode(encode(traj))
    assert out == traj and out.num_tokens == 0
    assert out.min_policy_version is None and out.staleness(9) == 0


def test_round_trip_large():
    n = 200_000
    rng = np.random.default_rng(0)
    lp = (-rng.random(n)).astype(np.float32).tolist()  # float32-exact so equality holds
    traj = make(n=n, token_ids=rng.integers(0, 157184, n).tolist(), logprobs=lp, segments=[(0, n, 1)],
                loss_mask=[1] * n, messages=[{"role": "assistant", "content": "x" * 1_000_000}])
    blob = encode(traj)
    # packed arrays: 4 + 4 + 1 bytes per token, plus the text
    assert len(blob) < 9 * n + 1_000_000 + 4096
    assert decode(blob) == traj


def test_logprobs_travel_as_float32():
    traj = make(logprobs=[0.0, 0.0, -0.1, -1.5, 0.0, -0.125])
    out = decode(encode(traj))
    assert out.logprobs[2] == pytest.approx(-0.1, abs=1e-7) and out.logprobs[2] != -0.1


def test_policy_versions_and_staleness():
    traj = make()
    assert (traj.min_policy_version, traj.max_policy_version) == (3, 4)
    assert traj.staleness(6) == 3 and traj.staleness(3) == 0
    assert traj.num_tokens == 6 and traj.num_model_tokens == 3


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(logprobs=[0.0] * 5), "equal lengths"),
        (dict(loss_mask=[0, 0, 1, 1, 0, 2]), "only 0 and 1"),
        (dict(segments=[(2, 7, 0)]), "segments[0]"),
        (dict(segments=[(3, 3, 0)]), "non-empty"),
        (dict(segments=[(2, 5, 0), (4, 6, 1)]), "before the previous segment"),
        (dict(segments=[(2, 4, -1)]), "policy version"),
        (dict(token_ids=[-1, 1, 2, 3, 4, 5]), "token_ids"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
        (dict(status="failed"), "error message"),
        (dict(status="weird"), "status"),
        (dict(unknown_field=1), "unknown_field"),
    ],
)
def test_validation_errors_name_the_problem(kw, needle):
    with pytest.raises(ValidationError) as err:
        make(**kw)
    assert needle in str(err.value)


def _doc(traj: Trajectory) -> dict:
    return msgpack.unpackb(encode(traj), raw=False)


def test_newer_compatible_version_ignores_unknown_fields_with_warning():
    doc = _doc(make())
    doc.update({"_v": SCHEMA_VERSION + 1, "_compat": SCHEMA_VERSION, "kv_cache_hint": [1, 2]})
    with pytest.warns(FutureSchemaWarning, match="kv_cache_hint"):
        out = decode(msgpack.packb(doc, use_bin_type=True))
    assert out == make().model_copy(update={"trajectory_id": out.trajectory_id, "group_id": out.group_id,
                                            "created_at": out.created_at})


def test_newer_incompatible_version_fails_clearly():
    doc = _doc(make())
    doc.update({"_v": SCHEMA_VERSION + 3, "_compat": SCHEMA_VERSION + 2})
    with pytest.raises(TrajectoryDecodeError, match=f"version {SCHEMA_VERSION + 3}.*upgrade"):
        decode(msgpack.packb(doc, use_bin_type=True))


def test_v1_is_migrated():
    # a version-1 document: one policy_version, no segments, no group_id
    traj = make()
    doc = _doc(traj)
    for key in ("segments", "group_id"):
        del doc[key]
    doc.update({"_v": 1, "policy_version": 5})
    doc.pop("_compat")
    out = decode(msgpack.packb(doc, use_bin_type=True))
    # model-token runs of loss_mask [0,0,1,1,0,1] become segments tagged with the one version
    assert out.segments == [Segment(2, 4, 5), Segment(5, 6, 5)]
    assert out.group_id == traj.trajectory_id
    assert set(T.MIGRATIONS) == set(range(1, SCHEMA_VERSION))


@pytest.mark.parametrize(
    "blob, needle",
    [
        (b"\xc1garbage", "not a msgpack trajectory"),
        (msgpack.packb([1, 2, 3]), "schema version"),
        (msgpack.packb({"run_id": "x"}), "schema version"),
        (msgpack.packb({"_v": 0}), "invalid"),
        (msgpack.packb({"_v": SCHEMA_VERSION, "run_id": "r"}), "task_id"),
    ],
)
def test_garbage_fails_with_decode_error(blob, needle):
    with pytest.raises(TrajectoryDecodeError, match=needle):
        decode(blob)


def test_env_kwargs_round_trip_and_stay_readable_by_v2_readers():
    traj = make(env_kwargs={"difficulty": "hard", "tools": ["run", "read"], "max_turns": 8})
    out = decode(encode(traj))
    assert out == traj and out.env_kwargs["tools"] == ["run", "read"]
    assert make().env_kwargs == {}
    doc = _doc(traj)
    # additive field: the writer's version moved on, the oldest reader it needs did not
    assert (doc["_v"], doc["_compat"]) == (SCHEMA_VERSION, 2) and SCHEMA_VERSION >= 3
    # a version-2 document (written before env_kwargs existed) decodes with the empty default
    del doc["env_kwargs"]
    doc["_v"] = 2
    assert decode(msgpack.packb(doc, use_bin_type=True)).env_kwargs == {}


def test_env_kwargs_must_be_a_string_keyed_dict():
    with pytest.raises(ValidationError, match="env_kwargs"):
        make(env_kwargs=["difficulty", "hard"])


def test_packed_arrays_are_accepted_and_checked_like_lists():
    traj = make()
    packed = make(token_ids=array("i", traj.token_ids), logprobs=array("f", traj.logprobs),
                  loss_mask=array("B", traj.loss_mask))
    assert packed.token_ids == traj.token_ids and type(packed.token_ids) is list
    assert packed.loss_mask == traj.loss_mask and packed.logprobs == traj.logprobs
    with pytest.raises(ValidationError, match="token_ids must lie"):
        make(token_ids=array("i", [5, 6, -7, 8, 9, 10]))
    with pytest.raises(ValidationError, match="only 0 and 1"):
        make(loss_mask=array("B", [0, 0, 1, 1, 0, 3]))
    with pytest.raises(ValidationError, match="equal lengths"):
        make(logprobs=array("f", [0.0] * 5))


@pytest.mark.parametrize(
    "field, wire, needle",
    [
        ("token_ids", struct.pack("<6i", 100, 101, -5, 103, 104, 105), "token_ids must lie"),
        ("token_ids", b"\x01\x00\x00\x00\x02", "whole number of 4-byte items"),
        ("token_ids", [100, 101, 102, 103, 104, 105], "packed 'i'-array bytes"),
        ("logprobs", b"\x00" * 23, "logprobs: 23 bytes"),
        ("loss_mask", bytes([0, 0, 1, 1, 0, 7]), "only 0 and 1"),
        ("loss_mask", bytes([0, 0, 1, 1, 0]), "equal lengths"),
    ],
)
def test_tampered_packed_arrays_fail_with_decode_error(field, wire, needle):
    doc = _doc(make())
    doc[field] = wire
    with pytest.raises(TrajectoryDecodeError, match=needle):
        decode(msgpack.packb(doc, use_bin_type=True))


def test_status_vocabularies_are_str_enums_that_travel_as_plain_strings():
    assert [s.value for s in T.TrajectoryStatus] == ["ok", "failed", "truncated"]
    assert [s.value for s in T.ArchiveStatus] == ["consumed", "dropped_stale", "dropped_small_group", "failed"]
    traj = make(status="truncated")
    assert traj.status is T.TrajectoryStatus.TRUNCATED and traj.status == "truncated"
    assert _doc(traj)["status"] == "truncated" and decode(encode(traj)).status == "truncated"
    with pytest.raises(ValidationError, match="status"):
        make(status="stale")


def _v1_doc(**changes) -> bytes:
    doc = _doc(make())
    for key in ("segments", "group_id", "_compat"):
        doc.pop(key)
    doc.update({"_v": 1, "policy_version": 5, **changes})
    return msgpack.packb(doc, use_bin_type=True)


def _future_doc(**changes) -> dict:
    doc = _doc(make())
    doc.update({"_v": SCHEMA_VERSION + 1, "_compat": SCHEMA_VERSION, **changes})
    return doc


@pytest.mark.parametrize("blob, needle", [
    (_v1_doc(loss_mask=[0, 0, 1, 1, 0, 1]), "loss_mask must be packed"),  # failed in the v1 migration
    (_v1_doc(loss_mask=b"\x00\x01\x00"), "equal lengths"),
    (msgpack.packb({**_future_doc(), b"raw": 1}, use_bin_type=True), "field names must be strings"),
    (msgpack.packb(_future_doc(_compat="2"), use_bin_type=True), "needs a reader"),
    (msgpack.packb({**_doc(make()), "_v": True}), "schema version"),
    (msgpack.packb({**_doc(make()), "messages": [{"role": "user", "content": b"\xff"}]}, use_bin_type=True),
     "JSON values"),
    (msgpack.packb({**_doc(make()), "segments": [[1]]}, use_bin_type=True), "segments"),
])
def test_hostile_documents_fail_inside_the_decode_guard(blob, needle):
    with pytest.raises(TrajectoryDecodeError, match=needle):
        decode(blob)
