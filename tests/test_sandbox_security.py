"""What code inside a sandbox must not be able to do, for both backends (real bwrap, real
dockerd): read the caller's files or env, write outside its workdir, reach any network (the
host's loopback included), fork-bomb the host, exceed its memory, outlive its timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from sandboxes import Limits, create_sandbox

ROOT = Path(__file__).resolve().parents[1]


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


def test_cannot_see_host_files_or_env(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    in_tmp = tmp_path / "secret.txt"
    in_root = Path("/root") / f"kpop-test-{uuid.uuid4().hex}.txt"
    in_tmp.write_text(secret)
    in_root.write_text(secret)
    monkeypatch.setenv("KPOP_TEST_SECRET", secret)
    try:
        with create_sandbox(backend) as sb:
            for path in (in_tmp, in_root):
                r = sb.exec(["cat", str(path)])
                assert r.exit_code != 0 and secret not in r.stdout, path
            r = sb.exec(["sh", "-c", "ls -a /root /home 2>&1; env; cat /proc/1/environ"])
            assert secret not in r.stdout and in_root.name not in r.stdout
            assert "KPOP_TEST_SECRET" not in r.stdout
            assert sb.exec(["ls", str(ROOT)]).exit_code != 0  # the caller's checkout is invisible
    finally:
        in_root.unlink()


def test_mounts_are_visible_and_read_only(backend: str) -> None:
    # docker sandboxes run as nobody: a mounted tree must be world-readable (pytest's tmp_path is 0700)
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        Path(d, "data.txt").write_text("shared")
        with create_sandbox(backend, mounts={d: "/data"}) as sb:
            assert sb.exec(["cat", "/data/data.txt"]).stdout == "shared"
            r = sb.exec(["sh", "-c", "echo x > /data/new.txt"])
            assert r.exit_code != 0 and "Read-only" in r.stderr
        assert not Path(d, "new.txt").exists()


def test_cannot_write_outside_workdir(backend: str) -> None:
    name = f"kpop-{uuid.uuid4().hex}"
    targets = ["/", "/usr", "/usr/bin", "/etc", "/root", "/home", "/var", "/dev", "/proc", "/sys"]
    with create_sandbox(backend) as sb:
        r = sb.exec(py(f"""
            import os
            for d in {targets!r}:
                try:
                    with open(os.path.join(d, {name!r}), "w") as f:
                        f.write("x")
                    print("WROTE", d)
                except OSError:
                    pass
            open("/work/ok.txt", "w").write("ok")
        """))
        assert r.exit_code == 0, r.stderr
        assert "WROTE" not in r.stdout
        assert sb.read_file("ok.txt") == b"ok"
    for d in targets:
        assert not Path(d, name).exists()


@pytest.fixture
def tcp_server():
    """A real TCP server on the host's loopback and on its own interface address."""
    servers = []
    for host in ("127.0.0.1", "0.0.0.0"):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, 0))
        srv.listen(8)
        servers.append(srv)

    def serve(srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"hello from host\n")
            conn.close()

    for srv in servers:
        threading.Thread(target=serve, args=(srv,), daemon=True).start()
    own_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    targets = [("127.0.0.1", servers[0].getsockname()[1])]
    targets += [(ip, servers[1].getsockname()[1]) for ip in own_ip[:1]]
    yield targets
    for srv in servers:
        srv.close()


CONNECT = """
import socket, sys
for host, port in {targets!r}:
    try:
        s = socket.create_connection((host, port), timeout=2)
        print("CONNECTED", host, s.recv(100).decode().strip())
    except OSError as e:
        print("BLOCKED", host, e)
"""


def test_no_network_not_even_host_loopback(backend: str, tcp_server) -> None:
    # the host can reach it (the server works) ...
    with socket.create_connection(tcp_server[0], timeout=2) as s:
        assert s.recv(100) == b"hello from host\n"
    with create_sandbox(backend) as sb:
        r = sb.exec(py(CONNECT.format(targets=tcp_server)))
        assert r.exit_code == 0, r.stderr
        assert "CONNECTED" not in r.stdout
        assert r.stdout.count("BLOCKED") == len(tcp_server)
        r = sb.exec(py("import socket; print(socket.if_nameindex())"))
        assert "eth" not in r.stdout and "ens" not in r.stdout


def test_network_when_asked(backend: str, tcp_server) -> None:
    # the same probe succeeds with network=True: the test above can fail
    with create_sandbox(backend, limits=Limits(network=True)) as sb:
        r = sb.exec(py(CONNECT.format(targets=tcp_server[:1])))
        assert "CONNECTED 127.0.0.1 hello from host" in r.stdout, r.stdout + r.stderr


def _sandbox_gone(sb) -> bool:
    """No process of a closed sandbox is left on the host: its cgroup / container is gone."""
    if sb.backend == "bwrap":
        return not any(d.exists() for d in sb._dirs_for_test)
    import sandboxes.docker as sd

    return not sd.docker_client().api.containers(all=True, filters={"id": sb._id_for_test})


def test_fork_bomb_is_contained(backend: str) -> None:
    with create_sandbox(backend, limits=Limits(max_pids=16)) as sb:
        sb._dirs_for_test = list(sb._cgroup.dirs) if backend == "bwrap" else []
        sb._id_for_test = getattr(sb, "_cid", None)
        r = sb.exec(py("""
            import os, time
            n = 0
            try:
                for _ in range(500):
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    n += 1
            except OSError as e:
                print("LIMITED", n, e.errno)
        """), timeout=20)
        assert "LIMITED" in r.stdout, r.stdout + r.stderr
        assert int(r.stdout.split()[1]) <= 16
        # a classic shell bomb: runs into the limit; whatever it made dies with the exec
        r = sb.exec(["sh", "-c", "b() { b | b & }; b; sleep 100"], timeout=3)
        assert (r.timed_out or r.exit_code != 0) and r.duration_s < 10
        # the sandbox is clean and usable again, the host can still fork
        r = sb.exec(py("import os; print(sum(p.isdigit() for p in os.listdir('/proc')))"))
        assert r.stdout.strip() == "2", r.stdout  # the supervisor and this python
        assert subprocess.run(["true"]).returncode == 0
    assert _sandbox_gone(sb)


def test_memory_limit_kills(backend: str) -> None:
    with create_sandbox(backend, limits=Limits(memory_mb=64)) as sb:
        ok = sb.exec(py("b = b'x' * (16 << 20); print(len(b))"))
        assert ok.exit_code == 0 and not ok.oom_killed, ok
        r = sb.exec(py("b = b'x' * (256 << 20); print('survived')"), timeout=30)
        assert "survived" not in r.stdout
        assert r.exit_code != 0
        assert r.oom_killed and r.exit_code == 137  # both backends use a memory cgroup here
        assert sb.exec(["true"]).exit_code == 0  # the sandbox itself survived


def test_wall_timeout_kills(backend: str) -> None:
    with create_sandbox(backend) as sb:
        r = sb.exec(["sleep", "100"], timeout=1)
        assert r.timed_out and r.exit_code == 137
        assert 0.9 < r.duration_s < 5
        r = sb.exec(["sh", "-c", "sleep 100 & sleep 100 & wait"], timeout=0.5)  # children too
        assert r.timed_out and r.duration_s < 5


def test_cpu_time_limit(backend: str) -> None:
    with create_sandbox(backend, limits=Limits(cpu_time_s=1)) as sb:
        r = sb.exec(py("while True: pass"), timeout=30)
        assert not r.timed_out and r.exit_code in (128 + 24, 137), r  # SIGXCPU, then SIGKILL
        assert r.duration_s < 15


def test_file_size_limit(backend: str) -> None:
    with create_sandbox(backend, limits=Limits(file_size_mb=1)) as sb:
        assert sb.exec(["sh", "-c", "head -c 900000 /dev/zero > small"]).exit_code == 0
        r = sb.exec(["sh", "-c", "head -c 2000000 /dev/zero > big"])
        assert r.exit_code == 128 + 25, r  # SIGXFSZ
        assert len(sb.read_file("big")) == 1 << 20
