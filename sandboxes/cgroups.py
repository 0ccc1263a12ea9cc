"""One memory+pids cgroup per bwrap sandbox (docker makes its own).

bwrap has no resource limits of its own. Per-process rlimits cannot cap a whole sandbox
(RLIMIT_AS is per process; RLIMIT_NPROC is not enforced for root's uid), so when this process
may create cgroups (root, or a delegated v2 subtree) each sandbox gets one under
`kpop-sandboxes/`, named after its owner so the next start can remove what a crash left.
Where cgroups are not writable `Cgroup.create` returns None and the supervisor falls back to
rlimits.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path

from sandboxes.base import owner_alive, owner_token

log = logging.getLogger(__name__)

CGROUP_FS = Path("/sys/fs/cgroup")
ROOT_NAME = "kpop-sandboxes"
_reaped = False


def _roots() -> tuple[str, list[Path]] | None:
    """('v1'|'v2', the kpop-sandboxes dirs to create children in), or None if unusable."""
    if (CGROUP_FS / "cgroup.controllers").exists():  # pure v2
        ctrl = (CGROUP_FS / "cgroup.controllers").read_text().split()
        if "memory" not in ctrl or "pids" not in ctrl:
            return None
        root = CGROUP_FS / ROOT_NAME
        root.mkdir(exist_ok=True)
        for d in (CGROUP_FS, root):  # children get memory.* and pids.* files only if enabled
            (d / "cgroup.subtree_control").write_text("+memory +pids")
        return "v2", [root]
    mem, pids = CGROUP_FS / "memory", CGROUP_FS / "pids"
    if not (mem / "memory.limit_in_bytes").exists() or not (pids / "cgroup.procs").exists():
        return None
    roots = [mem / ROOT_NAME, pids / ROOT_NAME]
    for r in roots:
        r.mkdir(exist_ok=True)
    return "v1", roots


class Cgroup:
    def __init__(self, version: str, dirs: list[Path]) -> None:
        self.version = version
        self.dirs = dirs

    @classmethod
    def create(cls, memory_mb: int, max_pids: int) -> "Cgroup | None":
        try:
            found = _roots()
        except OSError as exc:
            log.info("no cgroups for sandboxes (%s); using rlimits", exc)
            return None
        if found is None:
            return None
        version, roots = found
        global _reaped
        if not _reaped:
            _reaped = True
            reap_stale(roots)
        name = f"{owner_token()}-{uuid.uuid4().hex[:8]}"
        cg = cls(version, [r / name for r in roots])
        mem = str(memory_mb << 20)
        try:
            for d in cg.dirs:
                d.mkdir()
            if version == "v1":
                memdir, piddir = cg.dirs
                (memdir / "memory.limit_in_bytes").write_text(mem)
                if (memdir / "memory.memsw.limit_in_bytes").exists():
                    (memdir / "memory.memsw.limit_in_bytes").write_text(mem)
                (piddir / "pids.max").write_text(str(max_pids))
            else:
                (d,) = cg.dirs
                (d / "memory.max").write_text(mem)
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(max_pids))
        except OSError as exc:
            cg.remove()
            log.info("cannot set up a sandbox cgroup (%s); using rlimits", exc)
            return None
        return cg

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    @property
    def oom_file(self) -> Path:
        return self.dirs[0] / ("memory.oom_control" if self.version == "v1" else "memory.events")

    def remove(self) -> None:
        """Kill what is left inside and remove the directories (waits briefly for exits)."""
        for d in self.dirs:
            _kill_and_rmdir(d)


def _kill_and_rmdir(d: Path, wait_s: float = 2.0) -> None:
    deadline = time.monotonic() + wait_s
    while d.exists():
        try:
            d.rmdir()
            return
        except OSError:
            pass
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
        if time.monotonic() > deadline:
            log.warning("could not remove cgroup %s", d)
            return
        time.sleep(0.01)


def reap_stale(roots: list[Path] | None = None) -> None:
    """Remove cgroups whose owning process is gone (a crashed caller)."""
    if roots is None:
        found = _roots()
        roots = found[1] if found else []
    for root in roots:
        for d in root.iterdir():
            if d.is_dir():
                owner = "-".join(d.name.split("-")[:2])
                if not owner_alive(owner):
                    _kill_and_rmdir(d)
