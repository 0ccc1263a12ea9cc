"""The floors of the code base import only downward (read from the source, no imports run):

    kpop/cli/  ->  actors/  ->  kpop/ + learner/  ->  environments/  ->  sandboxes/, kernels/

- nothing in kpop/ outside kpop/cli/ imports actors/ or learner/ (the CLI is the top floor);
- learner/, environments/, sandboxes/ and kernels/ never import ray: a GPU machine without Ray
  composes the loop from them;
- remote classes (`ray.remote`) are declared only in actors/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in `path`, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _violations(folders: list[str], banned: set[str], skip: str | None = None) -> list[str]:
    out = []
    for folder in folders:
        for path in _sources(folder):
            rel = path.relative_to(ROOT).as_posix()
            if skip and rel.startswith(skip):
                continue
            out += [f"{rel}:{line} imports {mod}" for line, mod in _imports(path) if mod in banned]
    return out


def test_the_scan_sees_imports_anywhere_in_a_file(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\ndef f():\n    from actors.controller import train\n    import ray.util\n")
    assert _imports(probe) == [(1, "os"), (3, "actors"), (4, "ray")]


def test_only_the_cli_imports_the_floors_above_kpop():
    assert _violations(["kpop"], {"actors", "learner"}, skip="kpop/cli/") == []


@pytest.mark.parametrize("folder", ["learner", "environments", "sandboxes", "kernels"])
def test_lower_floors_do_not_import_ray(folder):
    assert _sources(folder), f"{folder}/ has no Python files: the scan would prove nothing"
    assert _violations([folder], {"ray"}) == []


def test_remote_classes_live_in_actors():
    found = []
    for folder in ("kpop", "learner", "environments", "sandboxes", "kernels"):
        for path in _sources(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr == "remote"
                        and isinstance(node.value, ast.Name) and node.value.id == "ray"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
