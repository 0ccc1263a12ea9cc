"""Replay and re-grade archived episodes of the real environments (the coding one in a real
bubblewrap sandbox), played by the oracle and by a deliberately wrong agent."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from kpop.archive import TrajectoryArchive
from kpop.cli.evals import replay_cmd
from kpop.replay import first_divergence, format_report, replay, replay_env_kwargs, replay_path
from kpop.trajectory import SandboxIdentity
from demo_run import play

FAMILIES = ["kpop/tooluse-v0", "kpop/workflow-v0", "kpop/search-v0", "kpop/coding-v0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    trajs = [play(env_id, agent, seed) for env_id in FAMILIES for agent in ("oracle", "wrong") for seed in (0,)]
    trajs.append(play("kpop/workflow-v0", "oracle", 5, max_turns=2))  # cut by the runner: truncated
    with TrajectoryArchive(run) as archive:
        archive.write(trajs[:5], status="consumed", step=1, policy_version=1)
        archive.write(trajs[5:], status="dropped_stale", step=2, policy_version=4)
    return run


def test_replay_of_real_episodes_matches_100_percent(run_dir):
    trajs = TrajectoryArchive(run_dir).load()
    assert {t.reward for t in trajs if t.env_id != "kpop/search-v0"} == {0.0, 1.0}
    assert any(t.status == "truncated" for t in trajs)
    report = replay_path(run_dir)
    assert report.total == 9 and report.match_rate == 1.0, [r for r in report.results if not r.match]
    for r, t in zip(report.results, trajs):
        assert r.replayed_reward == t.reward and r.divergence is None


def test_tampered_observation_is_reported_at_its_step(run_dir):
    traj = next(t for t in TrajectoryArchive(run_dir).load(env_id="kpop/workflow-v0") if t.reward == 1.0)
    messages = copy.deepcopy(traj.messages)
    tool_msgs = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    i = tool_msgs[1]  # the env's answer to the second assistant turn
    messages[i]["content"] = messages[i]["content"].replace("O", "0")
    tampered = traj.model_copy(update={"messages": messages})
    report = replay([tampered])
    [r] = report.results
    assert not r.match and report.match_rate == 0.0
    assert r.divergence is not None and r.divergence.step == 2 and r.divergence.message_index == i
    assert r.divergence.recorded == messages[i] and r.divergence.replayed == traj.messages[i]
    assert r.replayed_reward == r.recorded_reward == 1.0  # same actions, same grade: only the observation differs

    # re-grading ignores observations but not the reward
    assert replay([tampered], regrade_only=True).match_rate == 1.0
    regraded = replay([traj.model_copy(update={"reward": 0.5})], regrade_only=True)
    assert regraded.match_rate == 0.0 and regraded.results[0].replayed_reward == 1.0


def test_first_divergence_counts_steps_and_lengths():
    rec = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": []},
           {"role": "tool", "tool_call_id": "c", "content": "1"}]
    assert first_divergence(rec, copy.deepcopy(rec)) is None
    assert first_divergence(rec, rec[:1] + [{"role": "user", "content": "x"}]).step == 0
    d = first_divergence(rec, rec[:2])
    assert d.step == 1 and d.message_index == 2 and d.replayed is None


def test_unknown_env_is_a_failed_replay_not_a_crash(run_dir):
    traj = TrajectoryArchive(run_dir).load(limit=1)[0].model_copy(update={"env_id": "acme/gone-v0"})
    [r] = replay([traj]).results
    assert not r.match and "cannot make env 'acme/gone-v0'" in r.error


def test_cli_json_and_exit_codes(run_dir, tmp_path):
    app = typer.Typer()
    app.command()(replay_cmd)
    runner = CliRunner()
    res = runner.invoke(app, [str(run_dir), "--json", "--env", "kpop/tooluse-v0"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["match_rate"] == 1.0 and doc["total"] == 2
    assert {r["recorded_reward"] for r in doc["results"]} == {0.0, 1.0}
    res = runner.invoke(app, [str(run_dir / "trajectories"), "--regrade-only", "--status", "dropped_stale"])
    assert res.exit_code == 0 and "regrade: 4/4 match" in res.stdout
    res = runner.invoke(app, [str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a run directory" in res.stderr


def test_status_help_lists_every_status_the_code_accepts():
    from kpop.trajectory import ArchiveStatus, TrajectoryStatus

    app = typer.Typer()
    app.command()(replay_cmd)
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    help_text = " ".join(res.stdout.split())
    for status in [*ArchiveStatus, *TrajectoryStatus]:
        assert status.value in help_text


# ---- an archive is untrusted input ----------------------------------------------------------------

def test_archived_host_path_kwarg_is_not_used_unless_trusted(run_dir, tmp_path):
    traj = TrajectoryArchive(run_dir).load(env_id="kpop/search-v0")[0]
    target = tmp_path / "written-by-the-archive"
    evil = traj.model_copy(update={"env_kwargs": {**traj.env_kwargs, "cache_dir": str(target)}})
    [r] = replay([evil]).results
    assert r.match and not target.exists()
    assert "host path" in r.refused_kwargs["cache_dir"]
    [r] = replay([evil], trust_archive=True).results  # the user's explicit choice
    assert r.match and not r.refused_kwargs and target.exists()


def test_archived_sandbox_kwargs_are_refused_unless_trusted(run_dir):
    traj = next(t for t in TrajectoryArchive(run_dir).load(env_id="kpop/coding-v0") if t.reward == 1.0)
    evil = traj.model_copy(update={"env_kwargs": {**traj.env_kwargs, "image": "/", "limits": {"network": True},
                                                  "not_a_kwarg": 1}})
    kwargs, refused = replay_env_kwargs(evil)
    assert not {"image", "limits", "not_a_kwarg"} & set(kwargs)
    assert refused == {"image": "it configures the sandbox", "limits": "it configures the sandbox",
                       "not_a_kwarg": "kpop/coding-v0 does not declare this kwarg"}
    report = replay([evil])
    assert report.match_rate == 1.0 and set(report.results[0].refused_kwargs) == {"image", "limits", "not_a_kwarg"}
    assert "--trust-archive" in format_report(report)
    # the recorded docker image is archive data too
    docker = traj.model_copy(update={"sandbox": SandboxIdentity(backend="docker", image="attacker/image:latest")})
    kwargs, refused = replay_env_kwargs(docker)
    assert kwargs.get("backend") == "docker" and "image" not in kwargs and "sandbox.image" in refused
    assert replay_env_kwargs(docker, trust_archive=True)[0]["image"] == "attacker/image:latest"
    # what the caller passes is the caller's
    assert replay_env_kwargs(evil, {"image": "mine:1"})[0]["image"] == "mine:1"


def test_a_truncated_part_is_skipped_and_counted(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with TrajectoryArchive(copy) as archive:  # a second part, which stays readable
        archive.write(TrajectoryArchive(run_dir).load(env_id="kpop/tooluse-v0"), status="consumed", step=3)
    first = copy / "trajectories" / "part-000000.parquet"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # a disk filled up mid-write
    report = replay_path(copy)
    assert report.total == 2 and report.match_rate == 1.0
    assert list(report.skipped_parts) == ["part-000000.parquet"]
    app = typer.Typer()
    app.command()(replay_cmd)
    res = CliRunner().invoke(app, [str(copy)])
    assert res.exit_code == 0 and "skipped unreadable archive part part-000000.parquet" in res.stdout, res.output
    # and with its index gone as well (the part was never completely published)
    (copy / "trajectories" / "part-000000.index.json").unlink()
    assert replay_path(copy).total == 2


def test_nothing_to_replay_is_an_error(run_dir):
    app = typer.Typer()
    app.command()(replay_cmd)
    res = CliRunner().invoke(app, [str(run_dir), "--env", "kpop/no-such-v0"])
    assert res.exit_code == 2 and "no trajectories to replay" in res.stderr and "env_id=kpop/no-such-v0" in res.stderr
    assert replay([]).match_rate == 0.0
