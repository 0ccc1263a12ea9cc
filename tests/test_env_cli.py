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


class _YesEnv(ChatEnv):
    """Answer "yes" for reward 1; subclasses break one promise each."""

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        return Task(task_id=options.get("task_id", f"yes/{rng.integers(1000)}"), prompt="say yes")

    def _toolbox(self, task: Task) -> Toolbox:
        def echo(x: int) -> int:
            """Echo."""
            return x

        return Toolbox([echo])

    def _verify(self, final):
        return float((final or {}).get("content") == "yes"), {}

    def oracle_action(self, messages):
        return assistant("yes")




class WrongOracleEnv(_YesEnv):
    """Its oracle answers wrongly: `check` must say so, not crash."""

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
    assert names == ["make", "gymnasium", "messages", "oracle", "random", "malformed", "after_end"]
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
    assert not checks["oracle"]["ok"] and "the oracle earned reward 0, not 1" in checks["oracle"]["detail"]["error"]
    assert checks["make"]["ok"] and checks["messages"]["ok"]
    human = runner.invoke(app, ["env", "check", wrong_env])
    assert human.exit_code == 1 and "FAIL  oracle" in human.output and "FAILED" in human.output


def test_check_unknown_id_and_bad_kwarg():
    res = runner.invoke(app, ["env", "check", "kpop/nope-v0"])
    assert res.exit_code == 2 and "unknown environment 'kpop/nope-v0'" in res.output
    res = runner.invoke(app, ["env", "check", "kpop/tooluse-v0", "--kwarg", "difficulty"])
    assert res.exit_code == 2 and "NAME=VALUE" in res.output


# ---- what an env author got wrong, and what `check` must say about it --------------------------------

class PunishingEnv(_YesEnv):
    """Wrong answers give -1."""

    def _verify(self, final):
        return (1.0 if (final or {}).get("content") == "yes" else -1.0), {}


class TenForSuccessEnv(_YesEnv):
    def _verify(self, final):
        return 10.0 * float((final or {}).get("content") == "yes"), {}


class KeepsTalkingEnv(_YesEnv):
    """step() after the end returns more messages instead of refusing."""

    def step(self, action):
        if self._done:
            return [{"role": "user", "content": "anything else?"}], 0.0, False, False, self._info()
        return super().step(action)


class SeedIgnoringEnv(_YesEnv):
    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        return Task(task_id=options.get("task_id", "yes/always"), prompt="say yes")


@pytest.fixture
def author_envs():
    envs = {"test/yes-v0": _YesEnv, "test/punishing-v0": PunishingEnv, "test/ten-v0": TenForSuccessEnv,
            "test/keeps-talking-v0": KeepsTalkingEnv, "test/seed-ignoring-v0": SeedIgnoringEnv}
    for env_id, cls in envs.items():
        register(env_id, cls)
    yield
    for env_id in envs:
        gymnasium.registry.pop(env_id, None)


@pytest.mark.parametrize("env_id, check, needles", [
    ("test/punishing-v0", "random", ["reward -1 is outside [0, 1]", "make _verify return a score in that range"]),
    ("test/punishing-v0", "malformed", ["reward -1 is outside [0, 1]"]),
    ("test/ten-v0", "oracle", ["reward 10 is outside [0, 1]", "KPop relies on rewards in [0, 1]"]),
    ("test/keeps-talking-v0", "after_end", ["step() after the episode ended returned", "must raise until reset()"]),
    ("test/seed-ignoring-v0", "messages", ["gave the same task 'yes/always' every time",
                                           "draw its task from its `rng` argument"]),
])
def test_check_names_what_an_author_must_fix(author_envs, env_id, check, needles):
    report = check_env(env_id, n_oracle=3, n_random=3)
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"] and not checks[check]["ok"], checks
    for needle in needles:
        assert needle in checks[check]["detail"]["error"], checks[check]["detail"]["error"]
    human = runner.invoke(app, ["env", "check", env_id])
    assert human.exit_code == 1 and f"FAIL  {check}" in human.output
    assert needles[0][:30] in " ".join(human.output.split()), human.output  # said in words, not as JSON


def test_a_correct_env_passes_including_the_contract(author_envs):
    report = check_env("test/yes-v0")
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    after_end = next(c for c in report["checks"] if c["name"] == "after_end")
    assert "RuntimeError" in after_end["detail"]["step_after_end_raised"]
