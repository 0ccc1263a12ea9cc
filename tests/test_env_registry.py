"""Registry: built-ins, make(), and third-party discovery through the `kpop.environments` entry points.

The plugin test installs a real (tiny) distribution: a module plus a `.dist-info` folder with
`entry_points.txt` on a temporary sys.path entry, found by importlib.metadata as pip-installed
packages are. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium
import pytest

from environments import ENTRY_POINT_GROUP, ChatEnv, list_envs, make, oracle_agent, register, run_episode

BUILTINS = {"kpop/tooluse-v0", "kpop/coding-v0", "kpop/search-v0", "kpop/workflow-v0"}

PLUGIN = '''
from environments import ChatEnv, Task, Toolbox, assistant


class ParrotEnv(ChatEnv):
    """Repeat the word back."""

    def __init__(self, word: str = "polly", **kw):
        super().__init__(**kw)
        self.word = word

    def _new_task(self, rng, options):
        return Task(task_id=options.get("task_id", "parrot/0"), prompt=f"say {self.word}")

    def _toolbox(self, task):
        return Toolbox([])

    def _verify(self, final):
        return float((final or {}).get("content") == self.word), {}

    def oracle_action(self, messages):
        return assistant(self.word)
'''


def test_builtins_are_listed_and_made():
    assert BUILTINS <= set(list_envs())
    env = make("kpop/tooluse-v0", difficulty=1)
    assert isinstance(env, ChatEnv) and env.difficulty == 1 and env.spec.id == "kpop/tooluse-v0"


def test_unknown_id_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown environment 'kpop/nope-v0'; known: .*kpop/tooluse-v0"):
        make("kpop/nope-v0")


def test_bad_kwargs_are_reported():
    with pytest.raises(ValueError, match="difficulty must be 0, 1 or 2"):
        make("kpop/tooluse-v0", difficulty=7)
    with pytest.raises(TypeError, match="colour"):
        make("kpop/tooluse-v0", colour="red")


def test_register_conflict_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register("kpop/tooluse-v0", "somewhere.else:Env")


def test_third_party_entry_point_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "acme_parrot.py").write_text(PLUGIN)
    dist = tmp_path / "acme_parrot-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-parrot\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        acme/parrot-v0 = acme_parrot:ParrotEnv
        """))
    assert "acme/parrot-v0" not in list_envs()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "acme/parrot-v0" in list_envs()
        env = make("acme/parrot-v0", word="kpop")
        assert type(env).__name__ == "ParrotEnv"
        ep = asyncio.run(run_episode(env, oracle_agent(env), seed=0))
        assert ep.status == "ok" and ep.reward == 1.0 and ep.env_id == "acme/parrot-v0"
    finally:
        gymnasium.registry.pop("acme/parrot-v0", None)
        sys.modules.pop("acme_parrot", None)


def test_layering_no_ray_or_deepspeed():
    """environments/ must stay importable without the cluster stack (DESIGN.md layering)."""
    code = ("import sys, environments, environments.check, environments.coding, environments.search, "
            "environments.tooluse, environments.workflow; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
