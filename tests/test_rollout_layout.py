"""Where the rollout side lives: plain classes in kpop/, Ray wiring alone in actors/, test and
bench helpers out of the product's lists."""

from __future__ import annotations

import ast
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_nothing_in_kpop_imports_actors_but_the_cli():
    upward = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "actors")
              for p in (ROOT / "kpop").rglob("*.py") if "cli" not in p.relative_to(ROOT / "kpop").parts}
    assert {p: m for p, m in upward.items() if m} == {}


def test_rollout_core_imports_no_ray():
    for path in [*(ROOT / "kpop" / "rollout").glob("*.py"), ROOT / "kpop" / "evaluate.py", ROOT / "kpop" / "sft.py"]:
        assert not {m for m in _imports(path) if m.split(".")[0] == "ray"}, path


def test_latency_env_is_a_bench_helper_not_a_listed_task():
    from environments import list_envs, make
    from kpop.cli.main import app

    res = CliRunner().invoke(app, ["env", "list", "--json"])
    assert res.exit_code == 0, res.output
    assert "kpop/latency-v0" not in res.stdout and "kpop/tooluse-v0" in res.stdout
    assert "kpop/latency-v0" not in list_envs()
    # the module-qualified id imports (and so registers) it wherever the env is made
    env = make("environments.latency:kpop/latency-v0", inner="kpop/tooluse-v0", fast_s=0.0, p_slow=0.0)
    try:
        assert type(env).__name__ == "LatencyEnv"
    finally:
        env.close()
