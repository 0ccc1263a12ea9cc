"""The archive's per-token learner record: decisions and route flips round trip, older parts read as
None, and hostile rows (written around `TrajectoryArchive.write`) are named, never crash a reader."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kpop.algo.losses import TokenDecision
from kpop.archive import _SCHEMA, DECISION_VALUES, ArchiveError, TrajectoryArchive
from test_archive import _traj

N = 12  # tokens of test_archive._traj


def test_decision_values_are_the_token_decisions():
    assert list(DECISION_VALUES) == [int(d) for d in TokenDecision]
    assert all(isinstance(d.reason, str) and d.reason for d in TokenDecision)
    assert TokenDecision.MASK_KL == 1 and TokenDecision.NOT_TRAINED == 4


def test_decisions_and_wide_route_flips_round_trip(tmp_path):
    ts = [_traj(i) for i in range(3)]
    decisions = [int(TokenDecision.NOT_TRAINED)] * 4 + [0, 1, 2] + [4, 4] + [0, 3, 0]
    wide = [0, 1, 2**78 + 5, 2**63, 0, 7, 0, 0, 1 << 40, 0, 0, 3]  # 79 MoE layers (Ring-2.6) need > 64 bits
    with TrajectoryArchive(tmp_path) as a:
        a.write(ts, status="consumed", step=1, policy_version=1, train_logprobs=[[-0.5] * N, None, [-0.25] * N],
                decisions=[decisions, None, [4] * N], route_flips=[wide, None, [0] * N])
    recs = TrajectoryArchive(tmp_path).records()
    assert [r.decisions for r in recs] == [decisions, None, [4] * N]
    assert [r.route_flips for r in recs] == [wide, None, [0] * N]
    assert recs[0].train_logprobs == [-0.5] * N and recs[1].train_logprobs is None


def test_parts_without_the_columns_read_as_none(tmp_path):
    """A part written before the per-token fields existed has no such columns at all."""
    with TrajectoryArchive(tmp_path) as a:
        a.write([_traj(0)], status="consumed", train_logprobs=[[-0.5] * N])
    part = a.parts()[0]
    old = pq.read_table(part).drop_columns(["decisions", "route_flips", "route_flip_bytes"])
    part.unlink()
    pq.write_table(old, part)
    (rec,) = TrajectoryArchive(tmp_path).records()
    assert rec.decisions is None and rec.route_flips is None and rec.train_logprobs == [-0.5] * N


@pytest.mark.parametrize("kwargs, message", [
    ({"decisions": [[0] * (N - 1)]}, "decisions[0] has 11 values for 12 tokens"),
    ({"decisions": [[0] * (N - 1) + [9]]}, "decisions[0] holds 9, not a TokenDecision value"),
    ({"decisions": [[0] * (N - 1) + [True]]}, "decisions[0] holds True"),
    ({"route_flips": [[0] * (N - 1) + [-1]]}, "route_flips[0] must hold ints >= 0"),
    ({"route_flips": [[0] * N, [0] * N]}, "route_flips has 2 entries for 1 trajectories"),
])
def test_bad_writes_are_named_and_buffer_nothing(tmp_path, kwargs, message):
    a = TrajectoryArchive(tmp_path)
    with pytest.raises(ArchiveError, match=message.replace("[", r"\[").replace("]", r"\]")):
        a.write([_traj(0)], status="consumed", **kwargs)
    a.close()
    assert len(TrajectoryArchive(tmp_path)) == 0


def _hostile_part(tmp_path, edits: list[dict]) -> TrajectoryArchive:
    """One good row, then one row per `edits` entry with those columns overwritten (as anyone who
    can write a parquet file could), written straight to a part."""
    with TrajectoryArchive(tmp_path) as a:
        n = len(edits) + 1
        a.write([_traj(i) for i in range(n)], status="consumed", train_logprobs=[[-0.5] * N] * n,
                decisions=[[0] * N] * n, route_flips=[[1] * N] * n)
    part = a.parts()[0]
    rows = pq.read_table(part).to_pylist()
    for row, edit in zip(rows[1:], edits):
        row.update(edit)
    part.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), part)
    return TrajectoryArchive(tmp_path)


HOSTILE = [
    ({"decisions": [0] * 3}, "decisions has 3 values for 12 tokens"),
    ({"decisions": [0] * (N - 1) + [77]}, "decisions holds 77"),
    ({"train_logprobs": [-0.5] * (N + 5)}, "train_logprobs has 17 values for 12 tokens"),
    ({"route_flips": b"\x01" * (N - 1), "route_flip_bytes": 1}, "route_flips has 11 bytes; 12 tokens x 1 bytes"),
    ({"route_flips": b"\x01" * N, "route_flip_bytes": 0}, "route_flip_bytes must be an int >= 1, got 0"),
    ({"route_flips": b"\x01" * N, "route_flip_bytes": None}, "route_flip_bytes must be an int >= 1, got None"),
]


@pytest.mark.parametrize("edit, message", HOSTILE)
def test_a_malformed_row_is_named(tmp_path, edit, message):
    archive = _hostile_part(tmp_path, [edit])
    with pytest.raises(ArchiveError, match="is invalid: " + message.replace("[", r"\[")):
        archive.records()


def test_errors_list_keeps_the_good_rows(tmp_path):
    archive = _hostile_part(tmp_path, [e for e, _ in HOSTILE])
    errors: list[str] = []
    recs = archive.records(errors=errors)
    assert len(recs) == 1 and recs[0].decisions == [0] * N and recs[0].route_flips == [1] * N
    assert len(errors) == len(HOSTILE)
    for err, (_, message) in zip(errors, HOSTILE):
        assert message in err and "part-000000.parquet" in err
