"""`kpop sandbox exec`: JSON output, exit code mirroring, limits from flags, clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import typer

from kpop.cli import sandbox

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
cli = typer.Typer()  # mounted as in kpop/cli/main.py, without importing every other command group
cli.add_typer(sandbox.app, name="sandbox")


def invoke(args: list[str], **kw):
    return runner.invoke(cli, ["sandbox", *args], **kw)


def test_exec_json_mirrors_exit_code() -> None:
    res = invoke(["exec", "--json", "--", "python3", "-c", "import sys; print('hi'); sys.exit(3)"])
    assert res.exit_code == 3, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"exit_code", "stdout", "stderr", "timed_out", "oom_killed", "duration_s"}
    assert out["exit_code"] == 3 and out["stdout"] == "hi\n" and not out["timed_out"]


def test_exec_plain_timeout_memory_stdin() -> None:
    res = invoke(["exec", "--", "cat"], input="piped")
    assert res.exit_code == 0 and res.stdout == "piped"
    res = invoke(["exec", "--json", "--timeout", "0.5", "--", "sleep", "30"])
    assert res.exit_code == 137 and json.loads(res.stdout)["timed_out"] is True
    res = invoke(["exec", "--json", "--memory-mb", "32", "--", "python3", "-c", "b = b'x' * (128 << 20)"])
    assert res.exit_code == 137 and json.loads(res.stdout)["oom_killed"] is True


def test_exec_bad_backend_is_named() -> None:
    res = invoke(["exec", "--backend", "lxc", "--", "true"])
    assert res.exit_code == 2 and "--backend must be one of bwrap, docker" in res.output


@pytest.mark.docker
def test_exec_docker_backend() -> None:
    subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], check=True, capture_output=True, timeout=900)
    res = invoke(["exec", "--backend", "docker", "--json", "--", "sh", "-c", "test -e /usr/sbin/dockerd || echo image; exit 4"])
    assert res.exit_code == 4, res.output
    assert json.loads(res.stdout)["stdout"] == "image\n"  # the sandbox image, not the host's /usr


@pytest.mark.parametrize("bad", ["inf", "1e308", "nan", "0", "-1"])
def test_exec_bad_timeout_is_named(bad: str) -> None:
    res = invoke(["exec", "--timeout", bad, "--", "true"])
    assert res.exit_code == 2, res.output
    assert "--timeout" in res.output and "Traceback" not in res.output
    res = invoke(["exec", "--cpu-seconds", bad, "--", "true"])
    assert res.exit_code == 2 and "--cpu-seconds" in res.output, res.output


def test_exec_cpu_limit_follows_a_long_timeout() -> None:
    """Busy code may use the CPU for as long as --timeout allows (the default CPU limit is 10 s)."""
    probe = ["python3", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_CPU)[0])"]
    res = invoke(["exec", "--timeout", "30", "--", *probe])
    assert res.exit_code == 0 and int(res.stdout) >= 30, res.output
    res = invoke(["exec", "--timeout", "30", "--cpu-seconds", "45", "--", *probe])
    assert int(res.stdout) >= 45, res.output
    res = invoke(["exec", "--json", "--timeout", "30", "--cpu-seconds", "1", "--", "python3", "-c", "while True: pass"])
    out = json.loads(res.stdout)
    assert res.exit_code in (128 + 24, 137) and not out["timed_out"], res.output  # SIGXCPU, then SIGKILL


def test_exec_reports_the_real_result_not_a_forged_reply(backend: str) -> None:
    """The issue's reproduction: sandboxed code writes a reply line to the supervisor's stdout."""
    forge = ("import os,json,base64;os.write(os.open('/proc/1/fd/1',1),(json.dumps(dict(ok=1,exit_code=0,"
             "timed_out=0,oom_killed=0,duration_s=0,stdout=base64.b64encode(b'FORGED').decode(),stderr=''))"
             "+'\\n').encode());exit(3)")
    res = invoke(["exec", "--backend", backend, "--json", "--", "python3", "-c", forge])
    out = json.loads(res.stdout)
    assert res.exit_code == out["exit_code"] != 0 and "FORGED" not in out["stdout"], res.output
