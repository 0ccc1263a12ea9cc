"""RunConfig loading: shipped configs validate, bad configs fail with one message naming
file, field and reason, overrides apply, and `kpop config show` prints / rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kpop.config import (
    ConfigError,
    RunConfig,
    StreamConfig,
    config_from_dict,
    dump_config,
    load_config,
    remove_run_dir,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
# a config that trains: rl_steps > 0 needs at least one environment
MINIMAL = {"name": "t", "environments": {"train": [{"id": "kpop/tooluse-v0"}]}}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate_and_round_trip(path):
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), "dumped")
    assert again == cfg


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.2 reads 2e-5 as a float; PyYAML's YAML 1.1 rules would give the string '2e-5', which
    # strict typing would then refuse
    text = yaml.safe_dump(MINIMAL) + "learner:\n  lr: 2e-5\n  sft_lr: 1E+3\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.learner.lr == 2e-5 and cfg.learner.sft_lr == 1e3
    # and a string that looks like one survives a dump and a load
    cfg = config_from_dict({**MINIMAL, "name": "1e5"})
    assert load_config(write(tmp_path, dump_config(cfg))).name == "1e5"


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["learner.lr=2e-5", "stream.max_backlog=8", "ray.address=auto"])
    assert cfg.learner.lr == 2e-5 and isinstance(cfg.learner.lr, float)
    assert cfg.stream.max_backlog == 8 and cfg.ray.address == "auto"
    assert cfg.stream.redis_url is None  # embedded Redis by default
    assert cfg.out_dir == Path("runs") / "t"
    assert load_config(write(tmp_path, MINIMAL), ["environments.eval_seeds=3"]).environments.eval_seeds == [
        10000, 10001, 10002]  # a count is shorthand for seeds from 10000


@pytest.mark.parametrize(
    "data, overrides, field, reason",
    [
        ({**MINIMAL, "learner": {"lr": 1e-5, "lrr": 2}}, [], "learner.lrr", "unknown key"),
        ({**MINIMAL, "tpyo": 1}, [], "tpyo", "unknown key"),
        ({**MINIMAL, "learner": {"lr": "fast"}}, [], "learner.lr", "valid number"),
        (MINIMAL, ["rollout.num_workers=0"], "rollout.num_workers", "greater than or equal to 1"),
        (MINIMAL, ["stream.redis_url=localhost:6379"], "stream", "redis_url must start with"),
        (MINIMAL, ["schedule.mode=sync", "schedule.max_staleness=2"], "schedule", "max_staleness must be 0"),
        (MINIMAL, ["algorithm.advantage=rloo", "rollout.group_size=1"], "<root>", "group_size >= 2"),
        ({"name": "t"}, [], "<root>", "environments.train is empty"),
        (MINIMAL, ["environments.eval_seeds=0"], "environments.eval_seeds", "seed count must be >= 1"),
        (MINIMAL, ["policy.preset=huge"], "policy.preset", "'tiny', 'small' or 'bench-2b'"),
        # strict types where a number is meant
        (yaml.safe_dump(MINIMAL) + "learner:\n  lr: '2e-5'\n", [], "learner.lr", "valid number"),
        ({**MINIMAL, "rollout": {"num_workers": True}}, [], "rollout.num_workers", "valid integer"),
        (MINIMAL, ["rollout.num_workers=2.5"], "rollout.num_workers", "valid integer"),
        # finite bounds
        (MINIMAL, ["learner.lr=.inf"], "learner.lr", "finite number"),
        (MINIMAL, ["algorithm.clip_high=.inf"], "algorithm.clip_high", "finite number"),
        (MINIMAL, ["algorithm.clip_low=1.5"], "algorithm.clip_low", "less than 1"),
        (MINIMAL, ["sandbox.limits.wall_time_s=.inf"], "sandbox.limits", "finite number"),
        (MINIMAL, ["sandbox.limits.memory_mb=true"], "sandbox.limits", "must be a number"),
        (MINIMAL, ["environments.step_timeout_s=.nan"], "environments.step_timeout_s", "finite number"),
        (MINIMAL, ["learner.betas=[-3, 7]"], "learner.betas", "betas must each lie in [0, 1)"),
        # the run name is one safe path component
        (MINIMAL, ["name=.."], "name", "must be 1-100 characters"),
        (MINIMAL, ["name=/"], "name", "must be 1-100 characters"),
        (MINIMAL, ["name=a/b"], "name", "must be 1-100 characters"),
        (MINIMAL, ["name=" + "x" * 101], "name", "must be 1-100 characters"),
        # env ids and kwargs against the registry
        ({**MINIMAL, "environments": {"train": [{"id": "kpop/Echo-v0"}]}}, [], "environments.train[0].id",
         "unknown environment 'kpop/Echo-v0'; known: kpop/coding-v0"),
        ({**MINIMAL, "environments": {"train": [{"id": "kpop/tooluse-v0", "kwargs": {"difficuly": 1}}]}}, [],
         "environments.train[0].kwargs", "has no kwarg 'difficuly'; it accepts: difficulty, split"),
        ({**MINIMAL, "environments": {"train": MINIMAL["environments"]["train"],
                                      "eval": [{"id": "kpop/workflow-v0", "kwargs": {"split": "eval"}}]}}, [],
         "environments.eval[0].kwargs", "has no kwarg 'split'"),
    ],
)
def test_bad_config_names_file_field_reason(tmp_path, data, overrides, field, reason):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert str(path) in msg and f"field '{field}'" in msg and reason in msg, msg


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        (None, [], "no such config file"),
        ("learner: [unclosed", [], "not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        (yaml.safe_dump(MINIMAL), ["learner.lr"], "expected KEY=VALUE"),
        (yaml.safe_dump(MINIMAL), ["name.x=1"], "name is not a section"),
        ("name: a\nlearner:\n  lr: 1.0e-5\n  lr: 1.0e-3\n", [], "duplicate key 'lr' at line 4 \\(first at line 3\\)"),
        ("name: a\nname: b\n", [], "duplicate key 'name' at line 2"),
    ],
)
def test_unreadable_configs_and_overrides(tmp_path, text, overrides, needle):
    path = tmp_path / "run.yaml" if text is None else write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, overrides)


def test_stream_section_rules():
    assert StreamConfig(redis_url="rediss://:pw@redis.example:6380/0").redis_url.startswith("rediss://")
    with pytest.raises(ValueError, match="max_backlog"):
        StreamConfig(max_backlog=0)
    with pytest.raises(ValueError, match="unknown|Extra"):
        StreamConfig(bogus=1)


def test_cli_config_show(tmp_path):
    from kpop.cli.main import app

    path = write(tmp_path, MINIMAL)
    res = CliRunner().invoke(app, ["config", "show", str(path), "learner.lr=3e-5"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown["learner"]["lr"] == 3e-5 and shown["stream"]["key"] == "kpop:trajectories"
    res = CliRunner().invoke(app, ["config", "show", str(path), "--json"])
    assert json.loads(res.output)["name"] == "t"


def test_cli_bad_config_exits_2_with_one_message(tmp_path):
    path = write(tmp_path, {**MINIMAL, "learner": {"lrr": 1}})
    out = subprocess.run([sys.executable, "-m", "kpop.cli.main", "config", "show", str(path)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert "bad config" in out.stderr and "field 'learner.lrr': unknown key" in out.stderr
    assert "Traceback" not in out.stderr


# ---- --fresh deletes the run's own directory and nothing else --------------------------------------

def _runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "runs"
    for name in ("mine", "other"):
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "config.yaml").write_text("name: x\n")
    unrelated = tmp_path / "keep.txt"
    unrelated.write_text("precious")
    return root, root / "other", unrelated


def test_fresh_deletes_only_the_runs_own_directory(tmp_path):
    root, sibling, unrelated = _runs(tmp_path)
    cfg = config_from_dict({**MINIMAL, "name": "mine", "run_dir": str(root)})
    announced = []
    assert remove_run_dir(cfg, announce=announced.append) == (root / "mine").resolve()
    assert announced == [(root / "mine").resolve()]
    assert not (root / "mine").exists() and (sibling / "config.yaml").is_file() and unrelated.read_text() == "precious"
    assert remove_run_dir(cfg) is None  # nothing left to delete


@pytest.mark.parametrize("name", ["..", ".", "/", "../other", "mine/..", ""])
def test_fresh_refuses_unsafe_names_even_in_an_unvalidated_config(tmp_path, name):
    root, sibling, unrelated = _runs(tmp_path)
    cfg = RunConfig.model_construct(name=name, run_dir=root)  # code can bypass validation
    with pytest.raises(ValueError, match="run name"):
        remove_run_dir(cfg)
    assert (root / "mine").is_dir() and sibling.is_dir() and unrelated.read_text() == "precious"


def test_fresh_refuses_symlinks_and_directories_that_are_not_runs(tmp_path):
    root, sibling, unrelated = _runs(tmp_path)
    (root / "link").symlink_to(sibling)
    (root / "notarun").mkdir()
    (root / "notarun" / "data.txt").write_text("mine")
    (root / "empty").mkdir()
    for name, needle in (("link", "symlink"), ("notarun", "does not look like a KPop run")):
        with pytest.raises(ValueError, match=needle):
            remove_run_dir(config_from_dict({**MINIMAL, "name": name, "run_dir": str(root)}))
    assert (sibling / "config.yaml").is_file() and (root / "notarun" / "data.txt").is_file()
    assert remove_run_dir(config_from_dict({**MINIMAL, "name": "empty", "run_dir": str(root)})) is not None


@pytest.mark.parametrize("name, needle", [("..", "run name '..'"), ("notarun", "does not look like a KPop run")])
def test_cli_fresh_refuses_before_deleting_anything(tmp_path, name, needle):
    from kpop.cli.main import app

    root, sibling, unrelated = _runs(tmp_path)
    (root / "notarun").mkdir()
    (root / "notarun" / "data.txt").write_text("mine")
    path = write(tmp_path, MINIMAL)
    res = CliRunner().invoke(app, ["train", str(path), f"name={name}", f"run_dir={root}", "--fresh"])
    # a bad name is a ConfigError (kpop.cli.main turns it into exit 2); a refusal exits 2 itself
    said = res.output + (str(res.exception) if isinstance(res.exception, ConfigError) else "")
    assert (res.exit_code == 2 or isinstance(res.exception, ConfigError)) and needle in said, res.output
    assert (root / "mine").is_dir() and sibling.is_dir() and unrelated.read_text() == "precious"
    assert (root / "notarun" / "data.txt").is_file()
def test_sft_environments_default_to_train_and_validate(tmp_path):
    """`environments.sft` chooses where the SFT demonstrations come from; empty means the train envs."""
    assert load_config(write(tmp_path, MINIMAL)).environments.sft == []
    qs = load_config(ROOT / "configs" / "quickstart.yaml").environments
    # the quickstart's demonstrator is the train env with a weaker oracle; RL trains on the env as-is
    assert [s.id for s in qs.sft] == [s.id for s in qs.train]
    assert "oracle_tool_share" in qs.sft[0].kwargs and "oracle_tool_share" not in qs.train[0].kwargs
    bad = {**MINIMAL, "environments": {**MINIMAL["environments"], "sft": [{"kwargs": {}}]}}
    with pytest.raises(ConfigError, match=r"field 'environments.sft.0.id': Field required"):
        load_config(write(tmp_path, bad))


def test_an_env_named_by_module_and_id_loads(tmp_path):
    """A bench env that registers itself on import is named `module:id`; the config check imports it."""
    cfg = config_from_dict({**MINIMAL, "environments": {"train": [
        {"id": "environments.latency:kpop/latency-v0", "kwargs": {"fast_s": 0.01}}]}})
    assert cfg.environments.train[0].id == "environments.latency:kpop/latency-v0"
    with pytest.raises(ConfigError, match="has no kwarg 'fats_s'"):
        config_from_dict({**MINIMAL, "environments": {"train": [
            {"id": "environments.latency:kpop/latency-v0", "kwargs": {"fats_s": 0.01}}]}})
