"""The bubblewrap backend: the host's /usr (or a rootfs directory) read-only, every namespace
unshared, a private tmpfs workdir, no inherited environment, limits from a cgroup.

The supervisor runs as PID 1 (`--as-pid-1`) with the host's /usr/bin/python3. Nothing is
created on the host's disk, so a crash leaves no temp dirs; `--die-with-parent` plus EOF on
the supervisor's stdin take the sandbox down with its caller.

bwrap maps the sandbox user to the uid that runs bwrap. Run by root, that is host root: a
sandbox would own every root file it can see. So a root caller drops to nobody (`setpriv`)
before bwrap starts, and the sandbox's files are the host's world-readable ones at most.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import select
import shutil
import subprocess
import threading
from pathlib import Path

from sandboxes.base import SUPERVISOR_SOURCE, Sandbox, SandboxError, check_host_path
from sandboxes.cgroups import Cgroup
from sandboxes.limits import Limits

START_TIMEOUT_S = 30.0
OOM_FILE_INSIDE = "/run/kpop/oom_events"
# Read-only extras from the host's /etc that programs need to start fast and behave; nothing
# that identifies users or holds secrets.
ETC_FILES = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")
NOBODY = 65534  # the sandbox user inside, and the host user bwrap runs as when the caller is root
# a rootfs must bring its own copies of these, never the host's
HOST_DIRS = ("etc", "root", "home", "proc", "sys", "dev", "boot", "run", "var")


class _Spawner:
    """Forks bwrap from one long-lived thread.

    bwrap's --die-with-parent uses PR_SET_PDEATHSIG, which fires when the *thread* that forked
    it exits, so a sandbox created from a short-lived worker thread would die with that thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kpop-bwrap-spawner", daemon=True)
                self._thread.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, argv, kwargs))
        return fut.result()

    def _run(self) -> None:
        while True:
            fut, argv, kwargs = self._jobs.get()
            try:
                fut.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                fut.set_exception(exc)


_spawner = _Spawner()


class _PipeTransport:
    def __init__(self, proc: subprocess.Popen) -> None:
        self._w = proc.stdin.fileno()
        self._r = proc.stdout.fileno()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]

    def recv(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no data within {timeout:.1f}s")
        return os.read(self._r, 1 << 16)


def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError("bubblewrap is not installed: `apt-get install bubblewrap` "
                           "(or `bash scripts/system.sh`)")
    return path


def _rootfs(image: str | None) -> str | None:
    """A path (absolute or ./relative) is a rootfs directory to use read-only as /; anything
    else is a docker image name, which bwrap has no use for: it runs the host's /usr. That
    lets one run config name the image for both backends. The host's own root, or a tree that
    is or holds a sensitive host directory, is refused."""
    if not (image and image.startswith(("/", "./", "../"))):
        return None
    root = check_host_path(image, "bwrap image")
    for name in HOST_DIRS:
        try:
            same = os.path.samefile(os.path.join(root, name), "/" + name)
        except OSError:
            continue
        if same:
            raise SandboxError(f"bwrap image {image!r}: its {name}/ is the host's /{name}; "
                               "a rootfs must not expose host directories")
    return root


def _system_binds(root: str | None) -> list[str]:
    if root is not None:
        if not Path(root, "usr/bin/python3").exists():
            raise SandboxError(f"bwrap image {root!r} must be a rootfs directory with usr/bin/python3")
        return ["--ro-bind", root, "/"]
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):  # merged /usr: keep the symlink
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for f in ETC_FILES:
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    return args


def _drop_root() -> list[str]:
    """The argv prefix that runs bwrap as nobody when we are root (see the module docstring)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SandboxError("run as root, bwrap needs `setpriv` (util-linux) to drop to nobody; "
                           "without it the sandbox user would be host root")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


class BwrapSandbox(Sandbox):
    backend = "bwrap"

    def __init__(self, image: str | None = None, limits: Limits = Limits(),
                 mounts: dict[str, str] | None = None) -> None:
        super().__init__(limits)
        self.image = image
        bwrap = bwrap_path()
        mount_args = _mount_args(mounts or {}, self.workdir)
        system_binds = _system_binds(_rootfs(image))
        drop_root = _drop_root()
        self._cgroup = Cgroup.create(limits.memory_mb, limits.max_pids + 2)  # + bwrap + supervisor
        size = str(limits.disk_mb << 20)
        argv = [
            bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--as-pid-1",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox", "--clearenv",
            "--cap-drop", "ALL", "--disable-userns",
            *system_binds,
            "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
            "--perms", "0755", "--size", size, "--tmpfs", self.workdir,
        ]
        if limits.network:
            argv.insert(2, "--share-net")
        oom_files: list[str] = []
        if self._cgroup is not None:
            argv += ["--tmpfs", "/run", "--ro-bind", str(self._cgroup.oom_file), OOM_FILE_INSIDE]
            oom_files.append(OOM_FILE_INSIDE)
        argv += [*mount_args, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", self.workdir,
                 "/usr/bin/python3", "-I", "-S", "-c", SUPERVISOR_SOURCE,
                 self._supervisor_config(oom_files, rlimit_fallback=self._cgroup is None)]
        argv = [*drop_root, *argv]
        if self._cgroup is not None:
            # join the cgroup before exec'ing bwrap so that nothing it forks escapes it
            joins = " && ".join(f"echo $$ > {p}" for p in self._cgroup.procs_files)
            argv = ["/bin/sh", "-c", f'{joins} && exec "$0" "$@"', *argv]
        try:
            self._proc = _spawner.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env={}, cwd="/")
        except OSError as exc:
            self._release_cgroup()
            raise SandboxError(f"cannot start bwrap: {exc}") from exc
        try:
            self._attach(_PipeTransport(self._proc), START_TIMEOUT_S)
        except Exception as exc:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            err = self._proc.stderr.read().decode(errors="replace").strip()
            self._teardown()
            raise SandboxError(f"bwrap sandbox did not start: {exc}; bwrap said: {err or '-'}") from exc

    def _teardown(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if not stream.closed:
                    try:
                        stream.close()  # EOF: the supervisor kills everything and exits
                    except OSError:
                        pass
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()  # --die-with-parent takes the sandbox's PID 1 with it
                proc.wait()
            proc.stderr.close()
        self._release_cgroup()

    def _release_cgroup(self) -> None:
        if getattr(self, "_cgroup", None) is not None:
            self._cgroup.remove()
            self._cgroup = None


def _mount_args(mounts: dict[str, str], workdir: str) -> list[str]:
    args: list[str] = []
    for host, inside in mounts.items():
        if not os.path.exists(host):
            raise SandboxError(f"mount source {host!r} does not exist")
        host = check_host_path(host, "mount source")
        if not inside.startswith("/") or os.path.normpath(inside) in ("/", workdir):
            raise SandboxError(f"mount target {inside!r} must be an absolute path other than / "
                               f"and the workdir {workdir}")
        args += ["--ro-bind", host, os.path.normpath(inside)]
    return args
