"""Sandboxes: run untrusted commands isolated and limited, with bubblewrap or docker.

    from sandboxes import Limits, create_sandbox, SandboxPool
    with create_sandbox("bwrap", limits=Limits(wall_time_s=5)) as sb:
        sb.write_file("main.py", "print(6 * 7)")
        sb.exec(["python3", "main.py"]).stdout   # '42\\n'
    pool = SandboxPool("docker", size=4)        # one per worker: warm sandboxes, kept per spec
    with pool.acquire() as sb: ...              # or sb = pool.take(limits=...); ...; pool.put(sb)

What sandboxed code may and may not do: sandboxes/base.py, sandboxes/supervisor.py and the
project README's security model.
"""

from __future__ import annotations

from typing import Literal

from sandboxes.base import ExecResult, Sandbox, SandboxDeadError, SandboxError
from sandboxes.limits import Limits
from sandboxes.pool import SandboxPool

Backend = Literal["bwrap", "docker"]
BACKENDS: tuple[str, ...] = ("bwrap", "docker")


def create_sandbox(backend: Backend = "bwrap", image: str | None = None, limits: Limits = Limits(),
                   mounts: dict[str, str] | None = None) -> Sandbox:
    """A started sandbox. `image`: docker image (default kpop-sandbox:latest); for bwrap a path
    is a rootfs directory and anything else means the host's /usr. `mounts`: {host path:
    sandbox path}, read-only; both backends run as host nobody, so mounted files must be
    world-readable, and the host root and its sensitive directories are refused."""
    if backend == "bwrap":
        from sandboxes.bwrap import BwrapSandbox

        return BwrapSandbox(image, limits, mounts)
    if backend == "docker":
        from sandboxes.docker import DockerSandbox

        return DockerSandbox(image, limits, mounts)
    raise SandboxError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "ExecResult", "Limits", "Sandbox", "SandboxDeadError", "SandboxError",
           "SandboxPool", "create_sandbox"]
