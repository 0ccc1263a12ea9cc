"""Warm sandboxes for one worker, kept per spec (backend, image, limits, mounts).

    pool = SandboxPool("bwrap", limits=Limits(), size=2)  # the default spec; starts `size` of it now
    sb = pool.take(limits=Limits(memory_mb=256))          # a clean sandbox of that spec: an idle one,
                                                          # else a new one (callers never wait on each other)
    ...                                                   # one episode's execs and files
    pool.put(sb)                                          # back: reset and kept for the next taker
    with pool.acquire(image="x") as sb: ...               # take + put
    pool.starts                                           # sandboxes started so far (tests count them)
    pool.idle                                             # idle sandboxes, all specs together
    pool.close()                                          # closes the idle ones; later puts close theirs

`take()` arguments left out (None) mean the pool's default spec. A taken sandbox has just
answered a ping, so a dead one or one whose channel broke is never handed out. `put()` resets
it (every process killed; workdir, /tmp, /dev/shm and SysV IPC emptied), which also checks that
sandboxed code left the supervisor untouched; a sandbox that fails that, or died, is closed and
replaced, so nothing one episode did is seen by the next. At most `size` idle sandboxes are kept
per spec; more are closed on return. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sandboxes.base import Sandbox, SandboxError
from sandboxes.limits import Limits

if TYPE_CHECKING:
    from sandboxes import Backend

_Key = tuple[str, "str | None", Limits, frozenset]


class SandboxPool:
    def __init__(self, backend: "Backend" = "bwrap", image: str | None = None,
                 limits: Limits = Limits(), size: int = 2,
                 mounts: dict[str, str] | None = None, prestart: bool = True) -> None:
        if size < 0:
            raise SandboxError(f"pool size must be >= 0, got {size}")
        self.backend, self.image, self.limits, self.size = backend, image, limits, size
        self._mounts = dict(mounts or {})
        self._idle: dict[_Key, list[Sandbox]] = {}
        self._out: dict[int, tuple[Sandbox, _Key]] = {}  # id(sandbox) -> (sandbox, its spec)
        self._lock = threading.Lock()
        self._closed = False
        self.starts = 0
        if prestart:
            key = self._key(None, None, None, None)
            try:
                for _ in range(size):
                    self._idle.setdefault(key, []).append(self._new(key))
            except BaseException:
                self.close()
                raise

    def _key(self, backend: str | None, image: str | None, limits: Limits | None,
             mounts: dict[str, str] | None) -> _Key:
        return (backend or self.backend, image if image is not None else self.image, limits or self.limits,
                frozenset((mounts if mounts is not None else self._mounts).items()))

    def _new(self, key: _Key) -> Sandbox:
        from sandboxes import create_sandbox

        backend, image, limits, mounts = key
        sb = create_sandbox(backend, image, limits, dict(mounts))  # type: ignore[arg-type]
        with self._lock:
            self.starts += 1
        return sb

    @property
    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def take(self, backend: "Backend | None" = None, image: str | None = None, limits: Limits | None = None,
             mounts: dict[str, str] | None = None) -> Sandbox:
        """A clean, live sandbox of the given spec (defaults: the pool's); give it back with put()."""
        key = self._key(backend, image, limits, mounts)
        while True:
            with self._lock:
                if self._closed:
                    raise SandboxError("the sandbox pool is closed")
                idle = self._idle.get(key)
                sb = idle.pop() if idle else None
            if sb is None:
                sb = self._new(key)
            elif not self._responds(sb):
                continue
            with self._lock:
                self._out[id(sb)] = (sb, key)
            return sb

    def put(self, sb: Sandbox) -> None:
        """Return a sandbox from take(): reset and kept, or closed (and replaced if it died)."""
        with self._lock:
            entry = self._out.pop(id(sb), None)
        if entry is None or entry[0] is not sb:
            raise SandboxError("this sandbox is not from this pool, or was already given back")
        key = entry[1]
        if sb.alive:
            try:
                sb.reset()
            except SandboxError:  # includes SandboxDeadError (a tainted supervisor, a broken channel)
                sb.close()
        if not sb.alive:
            sb.close()
            if not self._short(key):
                return
            sb = self._new(key)  # keep the pool warm: replace what died
        with self._lock:
            if not self._closed and len(self._idle.get(key, ())) < self.size:
                self._idle.setdefault(key, []).append(sb)
                return
        sb.close()

    @contextmanager
    def acquire(self, backend: "Backend | None" = None, image: str | None = None, limits: Limits | None = None,
                mounts: dict[str, str] | None = None) -> Iterator[Sandbox]:
        sb = self.take(backend, image, limits, mounts)
        try:
            yield sb
        finally:
            self.put(sb)

    def _short(self, key: _Key) -> bool:
        with self._lock:
            return not self._closed and len(self._idle.get(key, ())) < self.size

    @staticmethod
    def _responds(sb: Sandbox) -> bool:
        if sb.alive:
            try:
                sb.ping()
                return True
            except SandboxError:
                pass
        sb.close()
        return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [sb for v in self._idle.values() for sb in v]
            self._idle = {}
        for sb in idle:
            sb.close()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
