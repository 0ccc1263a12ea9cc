"""A warm pool of sandboxes of one backend/image/limits.

`acquire()` hands out an idle sandbox (or starts one when none is idle, so callers never
wait on each other); on return it is reset (processes killed, workdir emptied) and kept, or
closed if the pool already holds `size` idle ones. A dead sandbox is dropped and replaced.
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


class SandboxPool:
    def __init__(self, backend: "Backend" = "bwrap", image: str | None = None,
                 limits: Limits = Limits(), size: int = 2,
                 mounts: dict[str, str] | None = None) -> None:
        if size < 0:
            raise SandboxError(f"pool size must be >= 0, got {size}")
        self.backend, self.image, self.limits, self.size = backend, image, limits, size
        self._mounts = dict(mounts or {})
        self._idle: list[Sandbox] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            for _ in range(size):
                self._idle.append(self._new())
        except BaseException:
            self.close()
            raise

    def _new(self) -> Sandbox:
        from sandboxes import create_sandbox

        return create_sandbox(self.backend, self.image, self.limits, self._mounts)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @contextmanager
    def acquire(self) -> Iterator[Sandbox]:
        sb = self._take()
        try:
            yield sb
        finally:
            self._give_back(sb)

    def _take(self) -> Sandbox:
        while True:
            with self._lock:
                if self._closed:
                    raise SandboxError("the sandbox pool is closed")
                sb = self._idle.pop() if self._idle else None
            if sb is None:
                return self._new()
            if sb.alive:
                return sb
            sb.close()

    def _give_back(self, sb: Sandbox) -> None:
        if sb.alive:
            try:
                sb.reset()
            except SandboxError:  # includes SandboxDeadError
                sb.close()
        if not sb.alive:
            sb.close()
            with self._lock:
                short = not self._closed and len(self._idle) < self.size
            if not short:
                return
            sb = self._new()  # keep the pool warm: replace what died
        with self._lock:
            if not self._closed and len(self._idle) < self.size:
                self._idle.append(sb)
                return
        sb.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sb in idle:
            sb.close()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
