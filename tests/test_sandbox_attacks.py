"""Attacks on the sandbox itself, on both backends (real bwrap, real dockerd): forging or
injecting control-channel messages, a channel that breaks, a sandbox user that is host root,
host paths as images or mounts, out-of-range timeouts, and state that leaks between pooled
episodes."""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from pathlib import Path

import pytest

from sandboxes import Limits, SandboxDeadError, SandboxError, SandboxPool, create_sandbox


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


# A reply in the shape the host reads, written by sandboxed code straight to the supervisor's stdout.
FORGE = """
import base64, json, os
line = json.dumps(dict(ok=1, exit_code=0, timed_out=0, oom_killed=0, duration_s=0,
                       stdout=base64.b64encode(b"FORGED").decode(), stderr="")) + "\\n"
for fd in ("/proc/1/fd/1", "/proc/1/fd/2"):
    try:
        os.write(os.open(fd, os.O_WRONLY), line.encode())
        print("WROTE", fd)
    except OSError as e:
        print("DENIED", fd, e)
raise SystemExit(3)
"""

# A request the supervisor would run, written by sandboxed code to the supervisor's stdin.
INJECT = """
import base64, json, os
req = {"op": "exec", "argv": ["echo", "INJECTED"], "env": {}, "cwd": "", "stdin": "", "timeout": 5}
try:
    os.write(os.open("/proc/1/fd/0", os.O_WRONLY), (json.dumps(req) + "\\n").encode())
    print("WROTE")
except OSError as e:
    print("DENIED", e)
"""

# Reading the host's requests (they may carry secrets: stdin of a grader) off the supervisor's stdin.
SNOOP = """
import os
for fd in ("/proc/1/fd/0", "/proc/1/mem", "/proc/1/environ"):
    try:
        os.open(fd, os.O_RDONLY)
        print("OPENED", fd)
    except OSError as e:
        print("DENIED", fd, e.errno)
"""


def test_sandboxed_code_cannot_forge_a_reply(backend: str) -> None:
    with create_sandbox(backend) as sb:
        try:
            r = sb.exec(py(FORGE))
        except SandboxDeadError:  # a detected forgery kills the sandbox: acceptable, never a forged result
            assert not sb.alive
            return
        assert r.exit_code == 3 and "FORGED" not in r.stdout, r
        assert "WROTE" not in r.stdout, r.stdout
        # and the channel is still in step: every later reply answers its own request
        for word in ("one", "two"):
            assert sb.exec(["echo", word]).stdout == word + "\n"


def test_sandboxed_code_cannot_inject_or_snoop_requests(backend: str) -> None:
    with create_sandbox(backend) as sb:
        r = sb.exec(py(INJECT))
        assert "WROTE" not in r.stdout, r.stdout
        assert sb.exec(["echo", "genuine"]).stdout == "genuine\n"
        r = sb.exec(py(SNOOP))
        assert "OPENED" not in r.stdout and r.stdout.count("DENIED") == 3, r.stdout + r.stderr


def _supervisor_host_pid(sb) -> int:
    """The supervisor's pid as the host sees it."""
    if sb.backend == "docker":
        import sandboxes.docker as sd

        return sd.docker_client().api.inspect_container(sb._cid)["State"]["Pid"]
    bwrap = sb._proc.pid
    (child,) = Path(f"/proc/{bwrap}/task/{bwrap}/children").read_text().split()
    return int(child)


@pytest.mark.parametrize("garbage", [b"not json at all\n",
                                     b'{"ok": true, "exit_code": 0, "stdout": "", "stderr": "", '
                                     b'"timed_out": false, "oom_killed": false, "duration_s": 0}\n',
                                     b"REPLAY"])
def test_a_broken_channel_kills_the_sandbox(backend: str, garbage: bytes) -> None:
    """A real fault from outside: the host (root) writes into the supervisor's stdout, which no
    sandboxed process can do. Whatever arrives that the supervisor did not sign for this very
    request (garbage, an unsigned reply, a genuine earlier reply replayed) kills the sandbox,
    and a pool never hands it out again."""
    with SandboxPool(backend, size=1) as pool:
        with pool.acquire() as sb:
            first = sb
            if garbage == b"REPLAY":  # a genuine reply of this sandbox, recorded off the wire
                seen: list[bytes] = []
                recv = sb._tx.recv
                sb._tx.recv = lambda timeout: seen.append(recv(timeout)) or seen[-1]
                sb.exec(["echo", "x"])
                sb._tx.recv = recv
                garbage = b"".join(seen)
            fd = os.open(f"/proc/{_supervisor_host_pid(sb)}/fd/1", os.O_WRONLY)
            os.write(fd, garbage)
            os.close(fd)
            with pytest.raises(SandboxDeadError, match="channel"):
                sb.exec(["echo", "hi"])
            assert not sb.alive
            with pytest.raises(SandboxDeadError):
                sb.exec(["echo", "again"])
        with pool.acquire() as sb:
            assert sb is not first and sb.alive
            assert sb.exec(["echo", "fresh"]).stdout == "fresh\n"


# -- the sandbox user is not host root ---------------------------------------------------------
def test_sandbox_user_is_not_host_root(backend: str) -> None:
    """Seen from the host (a uid_map read inside shows bwrap's intermediate namespace, not the host)."""
    with create_sandbox(backend) as sb:
        status = Path(f"/proc/{_supervisor_host_pid(sb)}/status").read_text()
        for key in ("Uid:", "Gid:"):
            (line,) = [ln for ln in status.splitlines() if ln.startswith(key)]
            assert "0" not in line.split()[1:], f"the sandbox runs as host {line}"


def test_root_only_host_file_is_unreadable_even_when_mounted(backend: str) -> None:
    with tempfile.TemporaryDirectory() as d:  # world-readable dir (sandboxes run as nobody), root-only file
        os.chmod(d, 0o755)
        secret = Path(d, "root-only.txt")
        secret.write_text("TOP-SECRET")
        secret.chmod(0o600)
        with create_sandbox(backend, mounts={d: "/data"}) as sb:
            assert sb.exec(["ls", "/data"]).stdout == "root-only.txt\n"
            r = sb.exec(["cat", "/data/root-only.txt"])
            assert r.exit_code != 0 and "TOP-SECRET" not in r.stdout, r


@pytest.mark.parametrize("image", ["/", "/proc/self/root", "/usr/..", "//", "LINK"])
def test_bwrap_refuses_the_host_root_as_image(image: str, tmp_path: Path) -> None:
    if image == "LINK":
        (tmp_path / "root").symlink_to("/")
        image = str(tmp_path / "root")
    with pytest.raises(SandboxError, match="host"):
        create_sandbox("bwrap", image=image)


def test_bwrap_refuses_a_rootfs_that_exposes_host_dirs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    os.symlink("/usr/bin/python3", rootfs / "usr" / "bin" / "python3")
    (rootfs / "etc").symlink_to("/etc")  # the host's /etc as the rootfs's (a bind mount alike)
    with pytest.raises(SandboxError, match="host"):
        create_sandbox("bwrap", image=str(rootfs))


@pytest.mark.parametrize("source", ["/", "/etc", "/root", "/proc/self/root", "/var/run"])
def test_sensitive_host_paths_cannot_be_mounted(backend: str, source: str) -> None:
    with pytest.raises(SandboxError, match="host"):
        create_sandbox(backend, mounts={source: "/data"})


# -- timeouts --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), 1e308, float("nan"), -1.0])
def test_exec_timeout_must_be_finite_and_sane(bad: float) -> None:
    with create_sandbox("bwrap") as sb:
        with pytest.raises(SandboxError, match="timeout"):
            sb.exec(["true"], timeout=bad)
        assert sb.exec(["echo", "ok"]).stdout == "ok\n"  # the bad call broke nothing
    with pytest.raises(ValueError):
        Limits(wall_time_s=bad)


# -- pooled sandboxes leak nothing between episodes ---------------------------------------------
LEAVE_STATE = """
import ctypes, os, resource, subprocess
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget(0x4b504f50, 4096, 0o1000 | 0o666) >= 0  # IPC_CREAT: a SysV segment
assert libc.msgget(0x4b504f51, 0o1000 | 0o666) >= 0        # and a message queue
for d in ("/work", "/tmp", "/dev/shm"):
    open(os.path.join(d, "left-behind"), "w").write("episode A")
subprocess.Popen(["sleep", "1000"], start_new_session=True)
try:  # same uid as the supervisor: lower what every later process would inherit from it
    resource.prlimit(1, resource.RLIMIT_NOFILE, (16, 16))
    print("LOWERED")
except OSError as e:
    print("DENIED", e)
"""

SEE_STATE = """
import os, resource
print("files", [d for d in ("/work", "/tmp", "/dev/shm") if os.path.exists(os.path.join(d, "left-behind"))])
print("procs", sorted(p for p in os.listdir("/proc") if p.isdigit()))
print("shm", open("/proc/sysvipc/shm").read().count("\\n") - 1)
print("msg", open("/proc/sysvipc/msg").read().count("\\n") - 1)
print("nofile", resource.getrlimit(resource.RLIMIT_NOFILE)[1])
"""


def test_pool_leaks_no_state_between_episodes(backend: str) -> None:
    with SandboxPool(backend, size=1) as pool:
        assert pool.starts == 1
        with pool.acquire() as sb:
            r = sb.exec(py(LEAVE_STATE))
            assert r.exit_code == 0, r.stderr
        with pool.acquire() as sb:
            seen = dict(line.split(" ", 1) for line in sb.exec(py(SEE_STATE)).stdout.splitlines())
        assert seen["files"] == "[]"
        assert len(eval(seen["procs"])) == 2  # the supervisor and this python
        assert seen["shm"] == "0" and seen["msg"] == "0"
        assert int(seen["nofile"]) > 16
        # a sandbox whose supervisor was tampered with is replaced, not cleaned: that costs a start
        assert pool.starts in (1, 2)


def test_pool_take_and_put_per_spec(backend: str) -> None:
    """The per-worker pool: sandboxes of any spec, kept warm per spec, counted starts."""
    small = Limits(memory_mb=128, max_pids=8)
    with SandboxPool(backend, size=1, prestart=False) as pool:
        assert pool.starts == 0 and pool.idle == 0
        a = pool.take(limits=small)
        assert a.limits == small and pool.starts == 1
        a.write_file("x.txt", "dirty")
        pool.put(a)
        b = pool.take(limits=small)
        assert b is a and pool.starts == 1  # warm, and reset
        assert b.exec(["ls", "-A"]).stdout == ""
        c = pool.take()  # another spec: a new sandbox
        assert c is not a and pool.starts == 2 and c.limits == Limits()
        pool.put(b)
        pool.put(c)
        assert pool.idle == 2
        with pytest.raises(SandboxError, match="not from this pool"):
            pool.put(c)
    assert not a.alive and not c.alive


def test_json_result_shape_unchanged(backend: str) -> None:
    with create_sandbox(backend) as sb:
        r = sb.exec(["sh", "-c", "printf 'a\\nb'; exit 7"])
        assert json.loads(r.model_dump_json())["exit_code"] == 7 and r.stdout == "a\nb"


def test_a_bind_mount_of_a_host_dir_is_recognised(backend: str, tmp_path: Path) -> None:
    """/etc under another name (a bind mount, as an archived trajectory could name) is still /etc."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("making a bind mount needs root")
    alias = tmp_path / "not-etc"
    alias.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", "/etc", str(alias)], check=True)
    try:
        with pytest.raises(SandboxError, match="host"):
            create_sandbox(backend, mounts={str(alias): "/data"})
    finally:
        subprocess.run(["umount", str(alias)], check=True)
