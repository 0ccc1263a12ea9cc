"""The Sandbox API and the warm pool, on both backends: exec, files, reset, errors that name
the problem, a dead sandbox, and nothing left behind when the caller crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandboxes import Limits, SandboxDeadError, SandboxError, SandboxPool, create_sandbox

ROOT = Path(__file__).resolve().parents[1]


def test_exec_io_env_cwd(backend: str) -> None:
    with create_sandbox(backend, limits=Limits(max_output_kb=1)) as sb:
        assert sb.workdir == "/work"
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.oom_killed) == (3, "out\n", "err\n", False, False)
        assert r.duration_s > 0
        assert sb.exec(["cat"], stdin="text in").stdout == "text in"
        blob = bytes(range(256)) * 3
        assert sb.exec(["wc", "-c"], stdin=blob).stdout.strip() == str(len(blob))
        r = sb.exec(["sh", "-c", "echo $FOO:$HOME:$PWD"], env={"FOO": "bar"})
        assert r.stdout == "bar:/work:/work\n"
        sb.exec(["mkdir", "sub"])
        assert sb.exec(["pwd"], cwd="sub").stdout == "/work/sub\n"
        assert sb.exec(["pwd"], cwd="/tmp").stdout == "/tmp\n"
        assert len(sb.exec(["head", "-c", "5000", "/dev/zero"]).stdout) == 1024  # max_output_kb
        r = sb.exec(["no-such-program"])
        assert r.exit_code == 127 and "no-such-program" in r.stderr


def test_files(backend: str) -> None:
    with create_sandbox(backend) as sb:
        sb.write_file("pkg/mod.py", "X = 42\n")
        sb.write_file("bin.dat", bytes(range(256)))
        assert sb.read_file("bin.dat") == bytes(range(256))
        assert sb.exec(["python3", "-c", "from pkg.mod import X; print(X)"]).stdout == "42\n"
        sb.exec(["sh", "-c", "echo made > out.txt"])
        assert sb.read_file("out.txt") == b"made\n"
        with pytest.raises(FileNotFoundError):
            sb.read_file("missing.txt")
        with pytest.raises(PermissionError, match="outside the workdir"):
            sb.write_file("../etc/evil", "x")
        with pytest.raises(PermissionError):
            sb.read_file("/proc/1/environ")


def test_exec_leaves_nothing_running_and_reset_cleans(backend: str) -> None:
    with create_sandbox(backend) as sb:
        t = time.monotonic()
        r = sb.exec(["sh", "-c", "sleep 100 & echo started"])
        assert r.stdout == "started\n" and time.monotonic() - t < 5
        r = sb.exec(["python3", "-c", "import os; print(sum(p.isdigit() for p in os.listdir('/proc')))"])
        assert r.stdout == "2\n"  # the supervisor and this python: the background sleep is gone
        sb.write_file("a/b.txt", "x")
        sb.exec(["sh", "-c", "touch /tmp/t .hidden"])
        sb.reset()
        assert sb.exec(["sh", "-c", "ls -A /work /tmp"]).stdout == "/tmp:\n\n/work:\n"
        assert sb.alive


def test_bad_input_is_named() -> None:
    with create_sandbox("bwrap") as sb:
        with pytest.raises(SandboxError, match="list of strings"):
            sb.exec("echo hi")  # type: ignore[arg-type]
        with pytest.raises(SandboxError, match="list of strings"):
            sb.exec([])
        with pytest.raises(SandboxError, match="timeout"):
            sb.exec(["true"], timeout=0)
        with pytest.raises(SandboxError, match="env"):
            sb.exec(["true"], env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(SandboxError, match="unknown sandbox backend 'lxc'"):
        create_sandbox("lxc")  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="does not exist"):
        create_sandbox("bwrap", mounts={"/no/such/dir": "/data"})
    with pytest.raises(SandboxError, match="mount target"):
        create_sandbox("bwrap", mounts={"/usr": "/"})
    with pytest.raises(SandboxError, match="rootfs"):
        create_sandbox("bwrap", image="/no/such/rootfs")
    with create_sandbox("bwrap", image="kpop-sandbox:latest") as sb:  # a docker name: host /usr
        assert sb.exec(["true"]).exit_code == 0
    sb = create_sandbox("bwrap")
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.exec(["true"])


def test_backend_unavailable_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        create_sandbox("bwrap")


@pytest.mark.docker
def test_docker_unavailable_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, docker_ready: None) -> None:
    import sandboxes.docker as sd

    monkeypatch.setattr(sd, "_client", None)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxError, match="scripts/docker.sh"):
        create_sandbox("docker")
    monkeypatch.delenv("DOCKER_HOST")
    monkeypatch.setattr(sd, "_client", None)
    with pytest.raises(SandboxError, match="'kpop-no-such-image:1' not found.*scripts/docker.sh"):
        create_sandbox("docker", image="kpop-no-such-image:1")


def _kill_supervisor(sb) -> None:
    """A real fault: the sandbox's processes die under it, as on an OOM of the host or a crash."""
    if sb.backend == "bwrap":
        sb._proc.kill()  # --die-with-parent takes PID 1 inside with it
        sb._proc.wait(timeout=10)  # SIGKILL is asynchronous: on a loaded machine exec could still get through
    else:
        import sandboxes.docker as sd

        sd.docker_client().api.kill(sb._cid)


def test_pool_reuses_clean_and_replaces_dead(backend: str) -> None:
    with SandboxPool(backend, size=2) as pool:
        assert pool.idle == 2
        with pool.acquire() as sb:
            first = sb
            sb.write_file("x.txt", "dirty")
        assert pool.idle == 2
        with pool.acquire() as sb:
            assert sb is first  # warm: the same sandbox, reset
            assert sb.exec(["ls", "-A"]).stdout == ""
        with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:  # more than size: one is made
            assert len({id(a), id(b), id(c)}) == 3
        assert pool.idle == 2
        with pool.acquire() as sb:
            dead = sb
            _kill_supervisor(sb)
            with pytest.raises(SandboxDeadError):
                sb.exec(["true"], timeout=5)
            assert not sb.alive
        assert pool.idle == 2 and not dead.alive
        with pool.acquire() as a, pool.acquire() as b:
            assert dead not in (a, b)
            assert a.exec(["echo", "ok"]).stdout == b.exec(["echo", "ok"]).stdout == "ok\n"
    with pytest.raises(SandboxError, match="closed"):
        with pool.acquire():
            pass


def test_pool_from_threads() -> None:
    """Sandboxes made from short-lived threads outlive them (--die-with-parent watches a thread)."""
    results: list[str] = []
    with SandboxPool("bwrap", size=2) as pool:
        def work(i: int) -> None:
            with pool.acquire() as sb:
                results.append(sb.exec(["echo", str(i)]).stdout.strip())
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results, key=int) == [str(i) for i in range(6)]
        time.sleep(0.2)
        with pool.acquire() as sb:
            assert sb.exec(["echo", "still-alive"]).stdout == "still-alive\n"
    made: list = []
    t = threading.Thread(target=lambda: made.append(create_sandbox("bwrap")))
    t.start()
    t.join()
    time.sleep(0.2)
    with made[0] as sb:
        assert sb.exec(["echo", "still-alive"]).stdout == "still-alive\n"


CRASHER = """
import json, os, sys, threading, time
from sandboxes import SandboxPool, create_sandbox
from sandboxes.base import owner_token
backend = sys.argv[1]
pool = SandboxPool(backend, size=1)
sb = create_sandbox(backend)
threading.Thread(target=sb.exec, args=(["sleep", "1000"],), kwargs={"timeout": 1000}, daemon=True).start()
time.sleep(0.5)
print(json.dumps({"owner": owner_token()}), flush=True)
time.sleep(1000)
"""


def test_nothing_survives_a_crashed_caller(backend: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, backend], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        owner = json.loads(proc.stdout.readline())["owner"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    if backend == "bwrap":
        from sandboxes import cgroups

        groups = [d for r in (cgroups.CGROUP_FS / "pids" / cgroups.ROOT_NAME,) for d in r.glob(f"{owner}-*")]
        assert len(groups) == 2  # pool + sandbox
        while any((g / "cgroup.procs").read_text().strip() for g in groups):
            assert time.monotonic() < deadline, "sandbox processes outlived their caller"
            time.sleep(0.1)
        cgroups.reap_stale()
        assert not any(g.exists() for g in groups)
    else:
        import sandboxes.docker as sd

        client = sd.docker_client()
        label = {"label": f"{sd.LABEL}={owner}"}
        while client.api.containers(all=True, filters=label):
            assert time.monotonic() < deadline, "containers outlived their caller"
            time.sleep(0.2)
        # a container its owner could not take down (e.g. lost attach) is reaped by the next start
        orphan = client.containers.run(sd.DEFAULT_IMAGE, ["sleep", "1000"], detach=True, network_mode="none",
                                       labels={sd.LABEL: "1-0", sd.HOST_LABEL: socket.gethostname()})
        assert sd.reap_stale(client) >= 1
        assert not client.api.containers(all=True, filters={"id": orphan.id})
