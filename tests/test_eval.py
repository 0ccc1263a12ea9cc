"""`kpop eval`: a real (tiny, randomly initialised) policy checkpoint played through the embedded
engine and the chat surface in a real environment."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import typer
from typer.testing import CliRunner

from kpop.cli.evals import eval_cmd
from kpop.evaluate import EvalReport, checkpoint_dir, evaluate, pass_at_k, write_report

ENV = "kpop/tooluse-v0"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from kpop.policy.checkpoint import build_model, save_checkpoint
    from kpop.policy.presets import tiny_config
    from kpop.policy.tokenizer import get_tokenizer

    tok = get_tokenizer()
    model = build_model(tiny_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id), seed=1)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "7" / "policy"
    save_checkpoint(model, path)
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("n,k", [(1, 1), (3, 1), (4, 2), (5, 3), (6, 6)])
def test_pass_at_k_is_the_chance_a_k_subset_holds_a_pass(n, k):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_evaluate_greedy_checkpoint(ckpt, tmp_path):
    assert checkpoint_dir(ckpt.parent) == ckpt  # checkpoints/<step>/ holding the policy dir
    report = evaluate(ckpt.parent, ENV, 2, samples=2, temperature=0.0, max_new_tokens=10, max_turns=2)
    assert (report.tasks, report.samples, report.episodes, report.failed) == (2, 2, 4, 0)
    assert [r.seed for r in report.results] == [10_000, 10_000, 10_001, 10_001]
    assert report.mean_reward == pytest.approx(sum(r.reward for r in report.results) / 4)
    assert set(report.pass_at_k) == {"1", "2"} and all(0.0 <= v <= 1.0 for v in report.pass_at_k.values())
    a, b = report.results[:2]  # greedy: the two samples of a task are the same episode
    assert (a.reward, a.model_tokens, a.turns, a.task_id) == (b.reward, b.model_tokens, b.turns, b.task_id)
    assert all(0 < r.model_tokens <= 2 * 10 for r in report.results)

    # the same episode played by hand through the engine's chat surface gives the same result
    from environments import make, run_episode
    from kpop.policy.checkpoint import load_checkpoint
    from kpop.policy.tokenizer import load_tokenizer
    from kpop.rollout.chat import ChatClient, ChatSession
    from kpop.rollout.embedded import EmbeddedEngine

    tok = load_tokenizer(ckpt)
    engine = EmbeddedEngine(load_checkpoint(ckpt), tok)
    try:
        session = ChatSession(ChatClient(engine, tok), max_total_tokens=2048, temperature=0.0, max_tokens=10)
        ep = asyncio.run(run_episode(make(ENV), session, seed=10_001, max_turns=2))
    finally:
        engine.close()
    c = report.results[2]
    assert (ep.task_id, ep.reward, sum(session.trace.loss_mask)) == (c.task_id, c.reward, c.model_tokens)

    js, md = write_report(report, tmp_path)
    assert EvalReport.model_validate_json(js.read_text()) == report
    assert f"mean reward: **{report.mean_reward:.4f}**" in md.read_text()


def test_cli(ckpt, tmp_path):
    app = typer.Typer()
    app.command()(eval_cmd)
    runner = CliRunner()
    res = runner.invoke(app, [str(ckpt), "--env", ENV, "--episodes", "1", "--json", "--out", str(tmp_path),
                              "--max-new-tokens", "6", "--max-turns", "1", "--kwarg", "difficulty=1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["episodes"] == 1 and doc["env_kwargs"] == {"difficulty": 1}
    assert doc["results"][0]["task_id"].startswith("tooluse/d1/")
    assert (tmp_path / "eval-kpop_tooluse-v0.json").is_file() and (tmp_path / "eval-kpop_tooluse-v0.md").is_file()

    res = runner.invoke(app, [str(tmp_path / "nope"), "--env", ENV, "--episodes", "1"])
    assert res.exit_code == 2 and "not a policy checkpoint" in res.stderr
    res = runner.invoke(app, [str(ckpt), "--env", "acme/none-v0", "--episodes", "1"])
    assert res.exit_code == 2 and "unknown environment 'acme/none-v0'" in res.stderr


@pytest.fixture(scope="module")
def run_policy(ckpt, tmp_path_factory):
    """A run directory as `kpop train` leaves it: config.yaml beside the final policy."""
    import shutil

    from kpop.config import config_from_dict, dump_config

    run = tmp_path_factory.mktemp("runs") / "q"
    shutil.copytree(ckpt, run / "policy")
    cfg = config_from_dict({
        "name": "q", "rollout": {"max_new_tokens": 5, "max_turns": 1, "max_episode_tokens": 300, "temperature": 0.0},
        "environments": {"train": [{"id": ENV, "kwargs": {"difficulty": 1, "split": "train", "show_tools": False}}],
                         "eval": [{"id": ENV, "kwargs": {"difficulty": 1, "split": "eval", "show_tools": False}}]}})
    (run / "config.yaml").write_text(dump_config(cfg))
    return run / "policy"


def test_a_runs_policy_is_evaluated_with_the_runs_settings(run_policy):
    """#20: `kpop eval runs/<name>/policy` plays the run's eval env kwargs and rollout settings,
    says so, lets the command line override each, and writes nothing into the checkpoint."""
    app = typer.Typer()
    app.command()(eval_cmd)
    runner = CliRunner()
    before = sorted(p.name for p in run_policy.parent.rglob("*"))
    res = runner.invoke(app, [str(run_policy), "--env", ENV, "--episodes", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert f"settings: {run_policy.parent / 'config.yaml'}" in res.stderr
    doc = json.loads(res.stdout)
    assert doc["env_kwargs"] == {"difficulty": 1, "split": "eval", "show_tools": False}
    assert {k: doc["sampling"][k] for k in ("max_new_tokens", "max_turns", "max_episode_tokens", "temperature")} == {
        "max_new_tokens": 5, "max_turns": 1, "max_episode_tokens": 300, "temperature": 0.0}
    assert all(r["task_id"].startswith("tooluse/d1/") and r["turns"] <= 1 and 0 < r["model_tokens"] <= 5
               for r in doc["results"])
    assert sorted(p.name for p in run_policy.parent.rglob("*")) == before  # no report in the run

    res = runner.invoke(app, [str(run_policy), "--env", ENV, "--episodes", "2", "--json", "--max-turns", "2",
                              "--kwarg", "show_tools=true"])
    assert res.exit_code == 0, res.output
    assert "from the command line: max_turns, env kwarg show_tools" in res.stderr
    shown = json.loads(res.stdout)
    assert shown["env_kwargs"] == {"difficulty": 1, "split": "eval", "show_tools": True}
    assert shown["sampling"]["max_turns"] == 2 and shown["sampling"]["max_new_tokens"] == 5
    # the same tasks, now with the tool schemas in the prompt
    assert [r["task_id"] for r in shown["results"]] == [r["task_id"] for r in doc["results"]]
    assert all(a["tokens"] > b["tokens"] + 50 for a, b in zip(shown["results"], doc["results"]))

    res = runner.invoke(app, [str(run_policy), "--env", ENV, "--episodes", "1", "--json", "--no-run-config"])
    assert res.exit_code == 0, res.output
    assert "settings: defaults" in res.stderr
    assert json.loads(res.stdout)["env_kwargs"] == {} and json.loads(res.stdout)["sampling"]["max_new_tokens"] == 128
