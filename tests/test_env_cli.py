"""`kpop env list` and `kpop env check`: exit codes and the JSON report."""

from __future__ import annotations

import json
from typing import Any

import gymnasium
import numpy as np
import pytest
from typer.testing import CliRunner

from environments import ChatEnv, Task, Toolbox, assistant, register
from environments.check import check_env
from kpop.cli.main import app

runner = CliRunner()


class WrongOracleEnv(ChatEnv):
    """Its oracle answers wrongly: `check` must say so, not crash."""

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        return Task(task_id=options.get("task_id", f"w/{rng.integers(9)}"), prompt="say yes")

    def _toolbox(self, task: Task) -> Toolbox:
        def echo(x: int) -> int:
            """Echo."""
            return x

        return Toolbox([echo])

    def _verify(self, final):
        return float((final or {}).get("content") == "yes"), {}

    def oracle_action(self, messages):
        return assistant("no")


@pytest.fixture
def wrong_env():
    register("test/wrong-oracle-v0", WrongOracleEnv)
    yield "test/wrong-oracle-v0"
    gymnasium.registry.pop("test/wrong-oracle-v0", None)


def test_list():
    res = runner.invoke(app, ["env", "list"])
    assert res.exit_code == 0 and "kpop/tooluse-v0" in res.output.split()
    ids = json.loads(runner.invoke(app, ["env", "list", "--json"]).output)
    assert {"kpop/coding-v0", "kpop/search-v0", "kpop/workflow-v0"} <= set(ids)


def test_check_json_ok():
    res = runner.invoke(app, ["env", "check", "kpop/tooluse-v0", "--json", "--kwarg", "difficulty=2"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ok"] is True and report["env_id"] == "kpop/tooluse-v0"
    names = [c["name"] for c in report["checks"]]
    assert names == ["make", "gymnasium", "messages", "oracle", "random", "malformed"]
    assert all(c["ok"] for c in report["checks"])
    assert all(e["reward"] == 1.0 for e in report["checks"][3]["detail"]["episodes"])


@pytest.mark.parametrize("env_id", ["kpop/tooluse-v0", "kpop/coding-v0", "kpop/search-v0", "kpop/workflow-v0"])
def test_every_builtin_passes_its_check(env_id):
    report = check_env(env_id, n_oracle=3, n_random=2)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]


def test_check_reports_a_broken_env(wrong_env):
    res = runner.invoke(app, ["env", "check", wrong_env, "--json"])
    assert res.exit_code == 1
    checks = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert not checks["oracle"]["ok"] and "expected 1.0" in checks["oracle"]["detail"]["error"]
    assert checks["make"]["ok"] and checks["messages"]["ok"]
    human = runner.invoke(app, ["env", "check", wrong_env])
    assert human.exit_code == 1 and "FAIL  oracle" in human.output and "FAILED" in human.output


def test_check_unknown_id_and_bad_kwarg():
    res = runner.invoke(app, ["env", "check", "kpop/nope-v0"])
    assert res.exit_code == 2 and "unknown environment 'kpop/nope-v0'" in res.output
    res = runner.invoke(app, ["env", "check", "kpop/tooluse-v0", "--kwarg", "difficulty"])
    assert res.exit_code == 2 and "NAME=VALUE" in res.output
