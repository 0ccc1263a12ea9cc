"""The docker backend: one container per sandbox, created through the docker SDK from a local
image (scripts/docker.sh builds `kpop-sandbox:latest` with no registry).

The container's main process is the supervisor (PID 1), attached over the API's attach
stream, so a warm exec is a line on a socket rather than a `docker exec` round trip.
Containers run as nobody with no capabilities, a read-only root, tmpfs workdir and /tmp,
network "none" unless asked, and docker's own memory/pids limits. They are labelled with
their owner: `StdinOnce` + `AutoRemove` remove one when its caller's socket closes (crash
included), and the first sandbox of a process removes any whose owner is dead.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

from sandboxes.base import SUPERVISOR_SOURCE, Sandbox, SandboxError, check_host_path, owner_alive, owner_token
from sandboxes.limits import Limits

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "kpop-sandbox:latest"
LABEL = "kpop.sandbox"  # value: the owner token (pid-starttime) of the creating process
HOST_LABEL = "kpop.host"
START_TIMEOUT_S = 60.0
# where the container's own memory cgroup shows its OOM-kill counter (v1, then v2)
OOM_FILES = ["/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"]
HINT = "run `bash scripts/docker.sh` (installs docker.io, starts dockerd, builds the image)"

_client_lock = threading.Lock()
_client: Any = None


def docker_client() -> Any:
    """The shared SDK client; on first use also removes containers left by dead owners."""
    global _client
    with _client_lock:
        if _client is None:
            try:
                import docker
            except ImportError as exc:
                raise SandboxError("the docker SDK is missing: `pip install docker`") from exc
            try:
                client = docker.from_env(timeout=60)
                client.ping()
            except Exception as exc:
                raise SandboxError(f"no docker daemon is reachable ({exc}); {HINT}") from exc
            reap_stale(client)
            _client = client
        return _client


def reap_stale(client: Any) -> int:
    """Remove this host's sandbox containers whose owning process is gone. -> how many."""
    n = 0
    # the low-level list: the high-level one inspects each container and fails on one that
    # AutoRemove takes away meanwhile
    for c in client.api.containers(all=True, filters={"label": [LABEL, f"{HOST_LABEL}={socket.gethostname()}"]}):
        if not owner_alive((c.get("Labels") or {}).get(LABEL, "")):
            _remove(client.api, c["Id"])
            n += 1
    return n


def _remove(api: Any, cid: str) -> None:
    import docker.errors

    try:
        api.remove_container(cid, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:  # 409: AutoRemove is already removing it
        if exc.status_code != 409:
            log.warning("could not remove sandbox container %s: %s", cid[:12], exc)


class _AttachTransport:
    """The container's stdin/stdout over the attach socket; stdout arrives in frames of
    [stream(1), 0, 0, 0, size(4, big-endian)] + payload, stderr frames go to the log."""

    def __init__(self, sock: Any) -> None:
        self._holder = sock  # keeps the HTTP response (and so the socket) alive
        self._sock: socket.socket = getattr(sock, "_sock", sock)
        self._raw = b""

    def send(self, data: bytes) -> None:
        self._sock.settimeout(None)
        self._sock.sendall(data)

    def recv(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            if len(self._raw) >= 8:
                kind, size = self._raw[0], struct.unpack(">I", self._raw[4:8])[0]
                if len(self._raw) >= 8 + size:
                    payload, self._raw = self._raw[8:8 + size], self._raw[8 + size:]
                    if kind == 1:
                        if payload:
                            return payload
                    else:
                        log.debug("sandbox supervisor stderr: %s", payload.decode(errors="replace"))
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no data within {timeout:.1f}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout as exc:
                raise TimeoutError(f"no data within {timeout:.1f}s") from exc
            if not chunk:
                return b""
            self._raw += chunk

    def close_stdin(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        self._holder.close()


class DockerSandbox(Sandbox):
    backend = "docker"

    def __init__(self, image: str | None = None, limits: Limits = Limits(),
                 mounts: dict[str, str] | None = None) -> None:
        super().__init__(limits)
        import docker.errors

        self._tx: _AttachTransport | None = None
        self._cid: str | None = None
        self.image = image or DEFAULT_IMAGE
        client = docker_client()
        api = self._api = client.api
        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(f"docker image {self.image!r} not found; {HINT}") from exc
        mem = f"{limits.memory_mb}m"
        binds = {}
        for host, inside in (mounts or {}).items():
            if not inside.startswith("/") or inside.rstrip("/") in ("", self.workdir):
                raise SandboxError(f"mount target {inside!r} must be an absolute path other than / "
                                   f"and the workdir {self.workdir}")
            binds[check_host_path(host, "mount source")] = {"bind": inside, "mode": "ro"}
        host_config = api.create_host_config(
            network_mode="host" if limits.network else "none",
            mem_limit=mem, memswap_limit=mem,
            pids_limit=limits.max_pids + 1,  # +1: the supervisor
            read_only=True,
            tmpfs={self.workdir: f"size={limits.disk_mb}m,mode=1777",
                   "/tmp": f"size={limits.disk_mb}m,mode=1777"},
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            auto_remove=True, binds=binds or None,
        )
        try:
            self._cid = api.create_container(
                self.image,
                command=["python3", "-I", "-S", "-c", SUPERVISOR_SOURCE,
                         self._supervisor_config(OOM_FILES, rlimit_fallback=False)],
                stdin_open=True, tty=False, user="65534:65534",  # not detached: StdinOnce
                working_dir=self.workdir, environment={}, hostname="sandbox",
                labels={LABEL: owner_token(), HOST_LABEL: socket.gethostname()},
                host_config=host_config,
            )["Id"]
            sock = api.attach_socket(self._cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            tx = _AttachTransport(sock)
            api.start(self._cid)
            self._attach(tx, START_TIMEOUT_S)
        except docker.errors.DockerException as exc:
            self._teardown()
            raise SandboxError(f"cannot start a docker sandbox from {self.image!r}: {exc}") from exc
        except Exception:
            self._teardown()
            raise

    def _teardown(self) -> None:
        tx = self._tx
        if isinstance(tx, _AttachTransport):
            tx.close_stdin()  # EOF: the supervisor kills everything and exits; AutoRemove follows
            tx.close()
        if self._cid is not None:
            _remove(self._api, self._cid)
            self._cid = None
