"""`kpop replay --rescore`: the archived mismatch re-masked under other KPop / IcePop settings, without a
model; hostile rows are named and skipped, the rest still scored."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from kpop.archive import _SCHEMA, TrajectoryArchive
from kpop.cli.evals import replay_cmd
from kpop.replay import rescore_path
from kpop.trajectory import Segment, Trajectory

MASK = [0, 0, 0, 1, 1, 1, 0, 1, 1, 1]
# per loss token: (rollout logprob, learner logprob); deltas from tiny to large, both directions
PAIRS = [(-0.5, -0.5), (-0.5, -0.52), (-1.0, -1.4), (-2.0, -0.7), (-0.1, -3.0), (-3.0, -3.01)]


def _traj(i: int) -> tuple[Trajectory, list[float]]:
    behav, train, it = [], [], iter(PAIRS[i % 2 :] + PAIRS[: i % 2])
    for m in MASK:
        b, t = next(it) if m else (0.0, -4.0)  # a prompt token's learner logprob is never scored
        behav.append(b)
        train.append(t)
    traj = Trajectory(run_id="r", task_id=f"t{i}", env_id="kpop/tooluse-v0", token_ids=list(range(10)),
                      logprobs=behav, loss_mask=MASK, segments=[Segment(3, 6, 0), Segment(7, 10, 0)])
    return traj, train


def _binary_kl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def _expected(kind: str, *setting: float) -> int:
    n = 0
    for b, t in PAIRS:
        p, q = math.exp(t), math.exp(b)
        if kind == "kpop":
            n += not (_binary_kl(p, q) <= setting[0] and _binary_kl(q, p) <= setting[0])
        else:
            n += not (setting[0] <= p / q <= setting[1])
    return n


@pytest.fixture
def run_dir(tmp_path):
    rows = [_traj(i) for i in range(4)]
    with TrajectoryArchive(tmp_path) as a:
        a.write([t for t, _ in rows], status="consumed", step=1, policy_version=1,
                train_logprobs=[tr for _, tr in rows], decisions=[[4, 4, 4, 0, 1, 1, 4, 0, 0, 1]] * 4)
        a.write([_traj(9)[0]], status="dropped_stale", step=1, policy_version=3)  # never scored by the learner
    return tmp_path


def _cli(*args: str):
    app = typer.Typer()
    app.command()(replay_cmd)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400", "NO_COLOR": "1"})


def test_counts_match_the_formulas(run_dir):
    report = rescore_path(run_dir, [0.01, 0.5], [(0.5, 2.0), (0.9, 1.1)])
    assert report.trajectories == 4 and report.tokens == 24 and report.without_train_logprobs == 1
    assert report.archived == {"KEEP": 12, "MASK_KL": 12}
    got = [s.masked for s in report.settings]
    # each trajectory holds every pair once (rotated), so each count is 4x the per-pair count
    want = [4 * _expected("kpop", 0.01), 4 * _expected("kpop", 0.5), 4 * _expected("icepop", 0.5, 2.0),
            4 * _expected("icepop", 0.9, 1.1)]
    assert got == want and len(set(got)) > 1 and 0 < min(got) and max(got) < 24
    assert report.settings[0].mask_rate == pytest.approx(want[0] / 24)


def test_cli_text_and_json(run_dir):
    res = _cli(str(run_dir), "--rescore", "--kpop-phi", "0.01", "--icepop", "0.5,2.0")
    assert res.exit_code == 0, res.output
    assert "rescored 24 loss tokens of 4 trajectories" in res.stdout
    assert f"kpop phi=0.01: would mask {4 * _expected('kpop', 0.01)}" in res.stdout
    assert f"icepop [0.5, 2]: would mask {4 * _expected('icepop', 0.5, 2.0)}" in res.stdout
    doc = json.loads(_cli(str(run_dir), "--rescore", "--json", "--kpop-phi", "0.5").stdout)
    assert doc["settings"][0]["masked"] == 4 * _expected("kpop", 0.5) and doc["skipped"] == []


@pytest.mark.parametrize("args, message", [
    (["--rescore"], "needs at least one --kpop-phi"),
    (["--rescore", "--icepop", "2.0,0.5"], "needs finite 0 <= ALPHA < BETA"),
    (["--rescore", "--icepop", "half"], "an IcePop window is ALPHA,BETA"),
    (["--rescore", "--icepop", "0.5,inf"], "needs finite 0 <= ALPHA < BETA"),
    (["--rescore", "--kpop-phi", "-1"], "a KPop phi must be a finite number > 0"),
    (["--rescore", "--kpop-phi", "nan"], "a KPop phi must be a finite number > 0"),
    (["--kpop-phi", "0.1"], "settings of --rescore"),
    (["--rescore", "--kpop-phi", "0.1", "--regrade-only"], "belong to a replay, not to --rescore"),
])
def test_bad_settings_are_named(run_dir, args, message):
    res = _cli(str(run_dir), *args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_nothing_to_rescore(run_dir):
    res = _cli(str(run_dir), "--rescore", "--kpop-phi", "0.1", "--status", "dropped_stale")
    assert res.exit_code == 2 and "has the learner's logprobs to rescore" in res.stderr
    res = _cli(str(run_dir / "missing"), "--rescore", "--kpop-phi", "0.1")
    assert res.exit_code == 2 and "not a run directory" in res.stderr


HOSTILE = [
    ({"train_logprobs": [-1.0] * 3 + [float("nan")] + [-1.0] * 6}, "train_logprobs[3] = nan is not a log probability"),
    ({"train_logprobs": [-1.0] * 4 + [float("inf")] + [-1.0] * 5}, "train_logprobs[4] = inf is not a log probability"),
    ({"train_logprobs": [-1.0] * 5 + [0.5] + [-1.0] * 4}, "train_logprobs[5] = 0.5 is not a log probability"),
    ({"logprobs": [0.0] * 7 + [float("-inf")] + [-1.0] * 2}, "logprobs[7] = -inf is not a log probability"),
    ({"train_logprobs": [-1.0] * 4}, "train_logprobs has 4 values for 10 tokens"),
    ({"decisions": [0] * 9 + [42]}, "decisions holds 42"),
    ({"logprobs": [-1.0] * 3}, "equal lengths"),
]


def test_malformed_rows_are_named_and_the_rest_scored(run_dir):
    """Rows anyone could write into a part: each is skipped with its reason, nothing crashes, the good
    rows' counts are unchanged, and the command exits 1."""
    part = TrajectoryArchive(run_dir).parts()[0]
    rows = pq.read_table(part).to_pylist()
    for k, (edit, _) in enumerate(HOSTILE):
        row = dict(rows[k % 4], trajectory_id=f"bad-{k}")
        row.update(edit)
        rows.append(row)
    part.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), part)
    (part.with_name(part.name.replace(".parquet", ".index.json"))).unlink()  # rebuilt from the part

    report = rescore_path(run_dir, [0.01], [])
    assert report.trajectories == 4 and report.settings[0].masked == 4 * _expected("kpop", 0.01)
    assert len(report.skipped) == len(HOSTILE)
    for (_, message), why in zip(HOSTILE, sorted(report.skipped, key=lambda w: w.split("bad-")[1][0])):
        assert message in why and "bad-" in why
    res = _cli(str(run_dir), "--rescore", "--kpop-phi", "0.01")
    assert res.exit_code == 1 and res.stdout.count("skipped malformed row") == len(HOSTILE), res.output
