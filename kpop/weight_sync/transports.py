"""Bucketed transports: same process (device copy), same node (CUDA IPC / shared memory), Ray's
object store (CPU), and across GPUs or nodes (torch.distributed broadcast). When both ends are GPUs, buckets stay on the
GPU: weights never pass through host memory.

Every transport keeps its buckets between versions (allocated again only when the names, shapes
or dtypes change), so a publish is one fused copy into them. A consumer gets views into buckets:
it must copy them (the engines' `update_weights` does) before the next version is published.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import warnings
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kpop.weight_sync import buckets as B
from kpop.weight_sync.core import StateDict, WeightHandle, WeightSyncError


def _device_of(state: StateDict) -> torch.device:
    return next(iter(state.values())).device if state else torch.device("cpu")


class _Buckets:
    """The producer's buckets, reallocated only when the layout changes."""

    def __init__(self, bucket_bytes: int, device: torch.device | str | None, alloc=B.allocate) -> None:
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device) if device is not None else None
        self._alloc = alloc
        self.key: tuple | None = None
        self.layout: tuple[B.BucketSpec, ...] = ()
        self.buffers: list[torch.Tensor] = []

    def fill(self, state: StateDict, version: int) -> B.Manifest:
        key = B.layout_of(state)
        if key != self.key:
            self.layout = B.plan(state, self.bucket_bytes)
            self.buffers = self._alloc(self.layout, self.device or _device_of(state))
            self.key = key
        B.pack(state, self.layout, self.buffers)
        return B.seal(self.layout, self.buffers, version)


def _payload(handle: WeightHandle, kind: type, transport: str) -> Any:
    if not isinstance(handle, WeightHandle):
        raise WeightSyncError(f"{transport} receives a WeightHandle, got a {type(handle).__name__}")
    if not isinstance(handle.payload, kind):
        raise WeightSyncError(f"weights version {handle.version}: {transport} was handed a handle carrying a "
                              f"{type(handle.payload).__name__} (another transport's handle?)")
    return handle.payload


def _check_version(handle: WeightHandle, manifest: B.Manifest) -> None:
    if handle.version != manifest.version:
        raise WeightSyncError(f"handle says weights version {handle.version}, its manifest says {manifest.version}")


class CopySync:
    """Same process: the learner's tensors are copied into buckets on the consumer's `device`
    (GPU to GPU stays on the GPU). A handle is valid until the next publish reuses the buckets."""

    def __init__(self, device: torch.device | str | None = None, bucket_bytes: int = B.DEFAULT_BUCKET_BYTES,
                 verify: bool = True) -> None:
        self._buckets = _Buckets(bucket_bytes, device)
        self.verify = verify
        self._current: B.Manifest | None = None

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        self._current = self._buckets.fill(state, version)
        return WeightHandle(version, self._current)

    def receive(self, handle: WeightHandle) -> StateDict:
        manifest = _payload(handle, B.Manifest, "CopySync")
        _check_version(handle, manifest)
        if manifest is not self._current:
            now = self._current.version if self._current else None
            raise WeightSyncError(f"weights version {handle.version} is stale: its buckets now hold version {now}")
        if self.verify:
            B.verify(manifest, self._buckets.buffers)
        return B.views(manifest.buckets, self._buckets.buffers)

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self._buckets.buffers


# -- another process on the same GPU or node ------------------------------------------------------

@dataclass(frozen=True)
class IpcPayload:
    manifest: B.Manifest
    cuda: tuple[tuple[Any, tuple], ...] = ()  # per bucket: torch's (rebuild function, args) of a CUDA IPC handle
    files: tuple[str, ...] = ()  # per bucket: a /dev/shm file (CPU)
    host: str = ""  # the producer's host name: both kinds of handle mean nothing on another node


_SHM_NAME = re.compile(r"/dev/shm/kpop-wsync-\d+-[0-9a-f]{32}")


def _unlink(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class IpcSync:
    """Another process on the same node. On CUDA the buckets stay in the producer's GPU memory and
    the payload carries CUDA IPC handles (torch.multiprocessing's reductions); the consumer maps
    them (same GPU or a peer GPU of the node) and reads them in place. On CPU the buckets are
    /dev/shm files that every consumer maps. The producer keeps its buckets until `close()`, and
    must not publish the next version before every consumer has received this one (the
    controller waits for all rollout workers), or a consumer's checksum fails."""

    def __init__(self, device: torch.device | str | None = None, bucket_bytes: int = B.DEFAULT_BUCKET_BYTES,
                 verify: bool = True) -> None:
        self._buckets = _Buckets(bucket_bytes, device, self._allocate)
        self.verify = verify
        self._files: list[str] = []  # producer: the current CPU buckets' files
        self._finalizer = weakref.finalize(self, _unlink, self._files)
        self._mapped: dict[str, torch.Tensor] = {}  # consumer: files already mapped

    def _allocate(self, layout: tuple[B.BucketSpec, ...], device: torch.device) -> list[torch.Tensor]:
        if device.type != "cpu":
            return B.allocate(layout, device)
        _unlink(self._files)  # the previous layout's files; consumers' mappings of them stay valid
        self._files.clear()
        out = []
        for spec in layout:
            path = f"/dev/shm/kpop-wsync-{os.getpid()}-{uuid.uuid4().hex}"
            self._files.append(path)
            out.append(torch.from_file(path, shared=True, size=spec.buffer_bytes, dtype=torch.uint8))
        return out  # a new file reads as zeros, padding included

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        manifest = self._buckets.fill(state, version)
        bufs = self._buckets.buffers
        if bufs and bufs[0].is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            # reduced every version: the args carry an event recorded after this version's copy,
            # which the consumer's stream waits on before reading
            return WeightHandle(version, IpcPayload(manifest, cuda=tuple(reduce_tensor(b) for b in bufs),
                                                    host=socket.gethostname()))
        return WeightHandle(version, IpcPayload(manifest, files=tuple(self._files), host=socket.gethostname()))

    def receive(self, handle: WeightHandle) -> StateDict:
        p: IpcPayload = _payload(handle, IpcPayload, "IpcSync")
        _check_version(handle, p.manifest)
        here = socket.gethostname()
        if p.host != here:
            raise WeightSyncError(f"weights version {handle.version} were published over IPC on host {p.host!r}; this "
                                  f"process runs on {here!r}: IPC reaches processes of one node only (set "
                                  "learner.weight_sync: object_store for rollout workers on other nodes)")
        if p.cuda:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            if any(fn is not rebuild_cuda_tensor for fn, _ in p.cuda):
                raise WeightSyncError("an IPC payload entry is not a CUDA IPC handle (torch's rebuild_cuda_tensor)")
            bufs = [fn(*args) for fn, args in p.cuda]
        else:
            bufs = [self._map(path, spec.buffer_bytes) for path, spec in zip(p.files, p.manifest.buckets)]
            for gone in set(self._mapped) - set(p.files):  # a previous layout's files
                del self._mapped[gone]
        if self.verify:
            B.verify(p.manifest, bufs)
        return B.views(p.manifest.buckets, bufs)

    def _map(self, path: str, nbytes: int) -> torch.Tensor:
        t = self._mapped.get(path)
        if t is None:
            # from_file(shared=True) creates or resizes what it is given: only this transport's files
            if not _SHM_NAME.fullmatch(path):
                raise WeightSyncError(f"{path!r} is not a weight-sync bucket (expected /dev/shm/kpop-wsync-<pid>-<id>)")
            if not os.path.exists(path):
                raise WeightSyncError(f"shared-memory bucket {path} is gone: its producer closed or republished a "
                                      "new layout")
            t = self._mapped[path] = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return t

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Producer: the current buckets."""
        return self._buckets.buffers

    def close(self) -> None:
        """Producer: remove the shared-memory files (consumers' existing mappings stay valid)."""
        self._finalizer()


# -- Ray's object store (CPU) ---------------------------------------------------------------------

class ObjectStoreSync:
    """Through Ray's object store: the learner packs host buckets (from the GPU: one device-to-host
    copy per bucket) and puts them there once, with the manifest; the handle carries the ObjectRef,
    so the driver forwards a reference and never holds the weights. Consumers read the buckets in
    place (zero-copy from the node's shared memory) and verify them. The object lives as long as
    the publishing process and some holder of the handle. The CPU path of a Ray run."""

    def __init__(self, bucket_bytes: int = B.DEFAULT_BUCKET_BYTES, verify: bool = True) -> None:
        self._buckets = _Buckets(bucket_bytes, "cpu")
        self.verify = verify

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        import ray  # imported here: the learner and its tests run without Ray

        manifest = self._buckets.fill(state, version)  # put copies them: the buckets are reused next version
        return WeightHandle(version, ray.put((manifest, [b.numpy() for b in self._buckets.buffers])))

    def receive(self, handle: WeightHandle) -> StateDict:
        import ray

        ref = _payload(handle, ray.ObjectRef, "ObjectStoreSync")
        got = ray.get(ref)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], B.Manifest)):
            raise WeightSyncError(f"weights version {handle.version}: the object store entry is not a weight-sync "
                                  "(manifest, buckets) pair")
        manifest, arrays = got
        _check_version(handle, manifest)
        with warnings.catch_warnings():  # read-only views into shared memory; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            bufs = [torch.from_numpy(a) for a in arrays]
        if self.verify:
            B.verify(manifest, bufs)
        return B.views(manifest.buckets, bufs)


# -- other GPUs or nodes --------------------------------------------------------------------------

class BroadcastSync:
    """torch.distributed broadcast of each bucket from the learner (rank `src` of `group`) to the
    rollout ranks, over a group set up once (nccl between GPUs, gloo on CPU). Buckets live on
    `device` at both ends, so with nccl nothing passes through host memory.

    `publish` (on `src`) packs and returns at once; a background thread sends the manifest, then
    the buckets, and completes when every other rank has called `receive`. The receivers take the
    manifest from the wire and drain every bucket before checking it against the handle they were
    given, so a mismatch raises on that rank and leaves the group in step for the next version.
    """

    def __init__(self, group: Any = None, *, src: int = 0, device: torch.device | str = "cpu",
                 bucket_bytes: int = B.DEFAULT_BUCKET_BYTES, verify: bool = True) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.src = src  # a global rank
        self.device = torch.device(device)
        self.verify = verify
        self._buckets = _Buckets(bucket_bytes, self.device)
        self._sender: threading.Thread | None = None
        self._error: BaseException | None = None
        self._recv_layout: tuple[B.BucketSpec, ...] | None = None
        self._recv_buffers: list[torch.Tensor] = []

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        if self.dist.get_rank() != self.src:
            raise WeightSyncError(f"only rank {self.src} publishes; this is rank {self.dist.get_rank()}")
        self.wait()  # the previous version is out of the buckets before they are refilled
        manifest = self._buckets.fill(state, version)
        self._sender = threading.Thread(target=self._send, args=(manifest,), name="kpop-weight-broadcast", daemon=True)
        self._sender.start()
        return WeightHandle(version, manifest)

    def wait(self) -> None:
        """Producer: block until the last published version reached every rank."""
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        if self._error is not None:
            err, self._error = self._error, None
            raise WeightSyncError(f"weight broadcast failed: {err}") from err

    def _send(self, manifest: B.Manifest) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
            data = torch.frombuffer(bytearray(manifest.to_json()), dtype=torch.uint8).to(self.device)
            self._bcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
            self._bcast(data)
            for buf in self._buckets.buffers:
                self._bcast(buf)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # sent before the buckets are refilled
        except BaseException as exc:  # reported by the next publish / wait
            self._error = exc

    def _bcast(self, t: torch.Tensor) -> None:
        self.dist.broadcast(t, src=self.src, group=self.group)

    def receive(self, handle: WeightHandle) -> StateDict:
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._bcast(n)
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self._bcast(data)
        manifest = B.Manifest.from_json(data.cpu().numpy().tobytes())
        if manifest.buckets != self._recv_layout:
            self._recv_layout, self._recv_buffers = manifest.buckets, B.allocate(manifest.buckets, self.device)
        for buf in self._recv_buffers:
            self._bcast(buf)
        expected: B.Manifest = handle.payload
        if handle.version != manifest.version or expected.buckets != manifest.buckets:
            what = "version" if handle.version != manifest.version else "bucket layout"
            raise WeightSyncError(f"weight broadcast mismatch ({what}): this rank was handed version {handle.version} "
                                  f"({len(expected.buckets)} buckets, {expected.nbytes:,} bytes), rank {self.src} sent "
                                  f"version {manifest.version} ({len(manifest.buckets)} buckets, {manifest.nbytes:,} bytes)")
        if self.verify:
            B.verify(manifest, self._recv_buffers)
        return B.views(manifest.buckets, self._recv_buffers)
