"""The Sandbox API shared by both backends.

A sandbox is one long-lived supervisor process (sandboxes/supervisor.py) running as PID 1 in
its own namespaces; the host talks to it over a byte stream, one signed JSON line per request
and reply (the supervisor's docstring says how and why). A backend only has to start that
process and hand over the stream (`_Transport`); exec, files, reset and error handling live
here, so the two backends behave the same.

A reply that is not signed for the request just sent (garbage, a forgery, a replay, bytes
nobody asked for) means the channel is broken: the sandbox is marked dead and closed at once
and the call raises `SandboxDeadError`; it is never used again (a pool replaces it).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import threading
import time
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from sandboxes.limits import MAX_SECONDS, Limits

SUPERVISOR_SOURCE = (Path(__file__).with_name("supervisor.py")).read_text()
WORKDIR = "/work"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": WORKDIR,
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
}
# Extra seconds the host waits for a reply beyond the exec's own timeout before it declares
# the sandbox dead (the supervisor enforces the timeout itself; this only catches a wedged one).
REPLY_GRACE_S = 10.0


class SandboxError(RuntimeError):
    """A sandbox cannot be created or used (backend missing, bad argument, ...)."""


class SandboxDeadError(SandboxError):
    """The sandbox's supervisor is gone, or its channel can no longer be trusted; this sandbox
    cannot be used again (a pool replaces it)."""


class _ChannelError(Exception):
    """A reply the supervisor did not sign for the request just sent."""


# Host paths no sandbox may see, even read-only, as its root or as a mount. Nothing at or under:
_NEVER_UNDER = ("/proc", "/sys", "/dev", "/etc", "/root", "/boot", "/run", "/var/run", "/var/lib/docker")
# and not these directories themselves (they hold every user's files or the ones above):
_NEVER_EXACT = ("/", "/home", "/var")


def check_host_path(path: str, what: str) -> str:
    """The resolved `path`; SandboxError if it is the host root (by any alias: a symlink,
    `/proc/self/root`, a bind mount) or a host directory that holds credentials, devices or
    the container runtime's socket."""
    real = os.path.realpath(path)
    bad = real in _NEVER_EXACT or any(real == d or real.startswith(d + "/") for d in _NEVER_UNDER)
    for d in (*_NEVER_EXACT, *_NEVER_UNDER):  # the same directory under another name (a bind mount)
        try:
            bad = bad or os.path.samefile(real, d)
        except OSError:
            pass
    if bad:
        raise SandboxError(f"{what} {path!r} resolves to {real!r}, a host path no sandbox may see "
                           f"(the host root, {', '.join(_NEVER_UNDER)} and what lies under them)")
    return real


class ExecResult(BaseModel):
    exit_code: int  # 128 + N when killed by signal N (the shell's convention)
    stdout: str
    stderr: str
    timed_out: bool
    oom_killed: bool
    duration_s: float


class _Transport(Protocol):
    """A byte stream to the supervisor's stdin/stdout."""

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes:
        """Some bytes; b"" at EOF; raises TimeoutError."""
        ...


def owner_token(pid: int | None = None) -> str:
    """`pid-starttime`: names this process in leftovers (pids get reused, start times do not)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def owner_alive(token: str) -> bool:
    pid, _, start = token.partition("-")
    return pid.isdigit() and _start_time(int(pid)) == start


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[19]


_LIVE: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sb in list(_LIVE):
        sb.close()


class Sandbox(ABC):
    """An isolated place to run commands. Thread-safe; one exec at a time per sandbox."""

    backend: str = ""
    workdir: str = WORKDIR

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._buf = b""
        self._dead: str | None = None
        self._closed = False
        self._tx: _Transport | None = None

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _teardown(self) -> None:
        """Stop the supervisor and free every resource; idempotent, never raises."""

    def _supervisor_config(self, oom_files: list[str], rlimit_fallback: bool) -> str:
        lim = self.limits
        return json.dumps({
            "workdir": self.workdir,
            "scratch": [self.workdir, "/tmp", "/dev/shm", "/dev/mqueue"],
            "cpu_time_s": lim.cpu_time_s,
            "file_size_mb": lim.file_size_mb,
            "max_output_bytes": lim.max_output_kb * 1024,
            "oom_files": oom_files,
            # without a cgroup, the per-process rlimits are the only memory/pid guard (a coarse one:
            # RLIMIT_NPROC counts every process of the host user the sandbox runs as, nobody)
            "rlimit_as_mb": lim.memory_mb if rlimit_fallback else 0,
            "rlimit_nproc": lim.max_pids if rlimit_fallback else 0,
        })

    def _attach(self, tx: _Transport, start_timeout: float) -> None:
        """Adopt the stream, hand the supervisor its signing key, wait for its signed hello."""
        self._tx = tx
        self._key = secrets.token_bytes(32)
        self._seq = 0
        tx.send(self._key.hex().encode() + b"\n")
        try:
            hello = self._read_reply(time.monotonic() + start_timeout)
        except _ChannelError as exc:
            raise SandboxError(f"{self.backend} sandbox did not start: {exc}") from exc
        if not hello.get("ready"):
            raise SandboxError(f"{self.backend} sandbox did not start: {hello}")
        _LIVE.add(self)

    # -- public API ----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and self._dead is None

    def exec(
        self,
        cmd: list[str],
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """Run `cmd` (argv, no shell) in the sandbox. Processes it leaves behind are killed."""
        if isinstance(cmd, (str, bytes)) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise SandboxError(f"cmd must be a non-empty list of strings (argv), got {cmd!r}; "
                               "for a shell line use ['sh', '-c', LINE]")
        timeout = self.limits.wall_time_s if timeout is None else float(timeout)
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_SECONDS):
            raise SandboxError(f"timeout must be a finite number of seconds in (0, {MAX_SECONDS:g}], got {timeout}")
        full_env = dict(BASE_ENV)
        for key, value in (env or {}).items():
            if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key:
                raise SandboxError(f"env must map names to strings; bad entry {key!r}: {value!r}")
            full_env[key] = value
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        reply = self._request(
            {"op": "exec", "argv": cmd, "env": full_env, "cwd": cwd or "",
             "stdin": base64.b64encode(data).decode(), "timeout": timeout},
            timeout + REPLY_GRACE_S,
        )
        return ExecResult(
            exit_code=reply["exit_code"],
            stdout=base64.b64decode(reply["stdout"]).decode(errors="replace"),
            stderr=base64.b64decode(reply["stderr"]).decode(errors="replace"),
            timed_out=reply["timed_out"],
            oom_killed=reply["oom_killed"],
            duration_s=reply["duration_s"],
        )

    def write_file(self, path: str, data: bytes | str) -> None:
        """Write a file under the workdir (`path` relative to it); parents are created."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._request({"op": "write", "path": path, "data": base64.b64encode(raw).decode()},
                      REPLY_GRACE_S + len(raw) / 2**24)

    def read_file(self, path: str) -> bytes:
        """Read a file under the workdir; FileNotFoundError if it is not there."""
        return base64.b64decode(self._request({"op": "read", "path": path}, REPLY_GRACE_S)["data"])

    def ping(self) -> None:
        """Return when the supervisor answers; SandboxDeadError (and closed) when it does not."""
        self._request({"op": "ping"}, REPLY_GRACE_S)

    def reset(self) -> None:
        """Kill every process in the sandbox and empty its workdir and /tmp."""
        self._request({"op": "reset"}, REPLY_GRACE_S)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        self._teardown()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # -- protocol ------------------------------------------------------------------------
    def _request(self, msg: dict[str, Any], reply_timeout: float) -> dict[str, Any]:
        with self._lock:
            if self._dead is not None:
                raise SandboxDeadError(f"{self.backend} sandbox is dead: {self._dead}")
            if self._closed:
                raise SandboxError(f"{self.backend} sandbox is closed")
            assert self._tx is not None
            self._seq += 1
            body = json.dumps({**msg, "seq": self._seq}).encode()
            try:
                self._tx.send(self._mac(b"q", body) + b" " + body + b"\n")
                reply = self._read_reply(time.monotonic() + reply_timeout)
            except (OSError, TimeoutError, SandboxDeadError) as exc:
                self._dead = f"{type(exc).__name__}: {exc}"
            except _ChannelError as exc:
                self._dead = f"its control channel is broken ({exc}); it will not be used again"
            else:
                if not reply["ok"] and reply.get("error") == "tainted":
                    self._dead = f"{reply.get('message')}; it will not be used again"
        if self._dead is not None:
            self.close()
            raise SandboxDeadError(f"{self.backend} sandbox died during {msg['op']}: {self._dead}")
        if not reply["ok"]:
            kind, message = reply.get("error"), reply.get("message", "")
            if kind == "not_found":
                raise FileNotFoundError(message)
            if kind == "permission":
                raise PermissionError(message)
            raise SandboxError(f"{msg['op']} failed in the sandbox: {message}")
        return reply

    def _mac(self, direction: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, direction + body, hashlib.sha256).hexdigest().encode()

    def _read_reply(self, deadline: float) -> dict[str, Any]:
        """The reply to request `self._seq`, verified; _ChannelError for anything else."""
        assert self._tx is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from the sandbox supervisor")
            chunk = self._tx.recv(left)
            if not chunk:
                raise SandboxDeadError("the sandbox supervisor exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        if self._buf:  # the supervisor sends exactly one line per request
            raise _ChannelError(f"{len(self._buf)} bytes arrived that no request asked for")
        mac, _, body = line.partition(b" ")
        if not hmac.compare_digest(mac, self._mac(b"r", body)):
            raise _ChannelError(f"a reply without a valid signature: {line[:80]!r}")
        reply = json.loads(body)
        if reply.get("seq") != self._seq:
            raise _ChannelError(f"reply {reply.get('seq')} to request {self._seq} (a replay)")
        return reply
