"""`source scripts/setup.sh` must leave the caller's shell as it found it (options), succeed or fail.

Run against a copy of the script in a temporary checkout with a real (pip-less) virtualenv that
already "has" that checkout installed (a .pth file): the script's own editable-install check then
passes, so the test never builds a venv, never runs pip, and never re-points the shared
development install at another checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
# errexit/nounset/pipefail as the caller had them, then prove the shell survives a failing command
PROBE = ('set +e +u; set +o pipefail; source "$REPO/scripts/setup.sh"; echo "status=$?"; echo "flags=$-"; '
         'echo "opts=$(set -o | grep -E "^(nounset|pipefail)" | tr -s " \\t" " " | tr "\\n" ",")"; '
         'false; echo still-alive; echo "venv=$KPOP_VENV"; echo "path=${PATH%%:*}"')


def _options_untouched(stdout: str) -> bool:
    flags = next(line for line in stdout.splitlines() if line.startswith("flags="))
    # $- has e for errexit and u for nounset ($(...) would not show errexit: subshells drop it)
    return "e" not in flags[6:] and "u" not in flags[6:] and "opts=nounset off,pipefail off," in stdout


@pytest.fixture
def checkout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    (repo / "requirements.txt").write_text("# nothing\n")
    (repo / "kpop").mkdir()
    (repo / "kpop" / "__init__.py").write_text("")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv / ".complete").touch()
    return repo, venv


def _installed(repo: Path, venv: Path) -> None:
    """Make `repo` the venv's kpop, as `pip install -e` would, so setup.sh has nothing to do."""
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "kpop-checkout.pth").write_text(f"{repo}\n")
    kpop = venv / "bin" / "kpop"
    kpop.write_text("#!/bin/sh\nexit 0\n")
    kpop.chmod(0o755)


def _source(repo: Path, venv: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KPOP_VENV": str(venv),
           "KPOP_CACHE": str(tmp_path / "cache"), "REPO": str(repo)}
    return subprocess.run([BASH, "--norc", "--noprofile", "-i", "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_sourcing_leaves_the_callers_shell_options_alone(checkout, tmp_path):
    repo, venv = checkout
    _installed(repo, venv)
    out = _source(repo, venv, tmp_path)
    assert "status=0" in out.stdout, out.stdout + out.stderr
    assert _options_untouched(out.stdout), out.stdout
    assert "still-alive" in out.stdout  # `false` did not close the interactive shell
    assert f"venv={venv}" in out.stdout and f"path={venv}/bin" in out.stdout


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_a_failing_setup_returns_an_error_and_leaves_the_shell_alive(checkout, tmp_path):
    repo, venv = checkout  # not installed, and the venv has no pip: the editable install fails
    out = _source(repo, venv, tmp_path)
    assert "status=1" in out.stdout and "[kpop setup] failed" in out.stderr, out.stdout + out.stderr
    assert _options_untouched(out.stdout) and "still-alive" in out.stdout
    assert f"path={venv}/bin" not in out.stdout  # nothing half-done is put on PATH
