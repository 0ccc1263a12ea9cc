"""Buckets: what every bucketed transport moves.

A state dict is flattened into buckets of at most `bucket_bytes` (a tensor bigger than that gets
a bucket of its own), each holding tensors of one dtype back to back in a flat uint8 buffer padded
to 8 bytes. A `Manifest` (names, shapes, dtypes, offsets, the version and a checksum per bucket)
describes them; the receiver rebuilds every tensor as a view into its bucket, so unpacking copies
nothing. Transports move whole buckets: a few large copies or collectives instead of one per tensor.

The checksum is two int64 sums of the bucket read as int32 words (all words, and the odd ones, so
swapped neighbours show; kernels/checksum): one pass at memory speed on the bucket's device and
one host sync per version, never per tensor. It catches changed, zeroed, truncated or overwritten
bytes; it is not a cryptographic hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from kernels.checksum import word_sums
from kpop.weight_sync.core import StateDict, WeightSyncError

DEFAULT_BUCKET_BYTES = 256 << 20
_ALIGN = 8  # bytes: buffers are padded so the checksum can read them as int32 words


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the bucket's dtype
    numel: int


@dataclass(frozen=True)
class BucketSpec:
    dtype: str  # torch dtype name, e.g. "bfloat16"
    nbytes: int  # payload bytes; the buffer is padded to a multiple of 8
    tensors: tuple[TensorSpec, ...]

    @property
    def buffer_bytes(self) -> int:
        return -(-self.nbytes // _ALIGN) * _ALIGN

    def describe(self) -> str:
        first = self.tensors[0].name
        more = f" and {len(self.tensors) - 1} more" if len(self.tensors) > 1 else ""
        return f"{self.dtype}, {self.nbytes:,} bytes: {first}{more}"


@dataclass(frozen=True)
class Manifest:
    version: int
    buckets: tuple[BucketSpec, ...]
    checksums: tuple[tuple[int, int], ...] = ()  # one per bucket, filled by `seal`

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        buckets = tuple(
            BucketSpec(b["dtype"], b["nbytes"], tuple(TensorSpec(t["name"], tuple(t["shape"]), t["offset"], t["numel"])
                                                    for t in b["tensors"]))
            for b in d["buckets"]
        )
        return cls(d["version"], buckets, tuple(tuple(c) for c in d["checksums"]))


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightSyncError(f"manifest names an unknown dtype {name!r}")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def plan(state: StateDict, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[BucketSpec, ...]:
    """Group the tensors by dtype (state-dict order within each) and fill buckets greedily."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        by_dtype.setdefault(t.dtype, []).append((name, t))
    buckets: list[BucketSpec] = []
    for dt, items in by_dtype.items():
        size = dt.itemsize
        specs: list[TensorSpec] = []
        used = 0
        for name, t in items:
            n = t.numel()
            if specs and used + n * size > bucket_bytes:
                buckets.append(BucketSpec(_dtype_name(dt), used * size, tuple(specs)))
                specs, used = [], 0
            specs.append(TensorSpec(name, tuple(t.shape), used, n))
            used += n
            if used * size >= bucket_bytes:  # full, or one tensor over the size: it stays alone
                buckets.append(BucketSpec(_dtype_name(dt), used * size, tuple(specs)))
                specs, used = [], 0
        if specs:
            buckets.append(BucketSpec(_dtype_name(dt), used * size, tuple(specs)))
    return tuple(buckets)


def layout_of(state: StateDict) -> tuple:
    """What decides the bucket layout: names, shapes and dtypes (cheap; no data read)."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in state.items())


def allocate(layout: tuple[BucketSpec, ...], device: torch.device | str) -> list[torch.Tensor]:
    # zeros, not empty: the padding is read by the checksum
    return [torch.zeros(b.buffer_bytes, dtype=torch.uint8, device=device) for b in layout]


def views(layout: tuple[BucketSpec, ...], buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor as a view into its bucket (no copy)."""
    if len(buffers) != len(layout):
        raise WeightSyncError(f"{len(buffers)} buffers for a manifest of {len(layout)} buckets")
    out: dict[str, torch.Tensor] = {}
    for i, (spec, buf) in enumerate(zip(layout, buffers)):
        if buf.dtype != torch.uint8 or buf.numel() != spec.buffer_bytes:
            raise WeightSyncError(f"bucket {i} ({spec.describe()}) has {buf.numel()} {buf.dtype} elements, "
                                  f"expected {spec.buffer_bytes} uint8")
        flat = buf[: spec.nbytes].view(_dtype(spec.dtype))
        for t in spec.tensors:
            out[t.name] = flat[t.offset : t.offset + t.numel].view(t.shape)
    return out


def pack(state: StateDict, layout: tuple[BucketSpec, ...], buffers: list[torch.Tensor]) -> None:
    """Copy `state` into the buckets: one fused multi-tensor copy (device to device when both
    are on the GPU; no host sync)."""
    dst = views(layout, buffers)
    names = list(dst)
    with torch.no_grad():
        torch._foreach_copy_([dst[k] for k in names], [state[k].detach() for k in names])


def checksums(buffers: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    if not buffers:
        return ()
    sums = torch.stack([word_sums(buf) for buf in buffers])
    return tuple(tuple(c) for c in sums.tolist())  # the one host sync


def seal(layout: tuple[BucketSpec, ...], buffers: list[torch.Tensor], version: int) -> Manifest:
    return Manifest(version, layout, checksums(buffers))


def verify(manifest: Manifest, buffers: list[torch.Tensor]) -> None:
    """Raise naming the version and bucket when a received bucket's checksum differs."""
    if len(manifest.checksums) != len(manifest.buckets):
        raise WeightSyncError(f"weights version {manifest.version}: manifest has {len(manifest.checksums)} "
                              f"checksums for {len(manifest.buckets)} buckets")
    got = checksums(buffers)
    for i, (spec, want, have) in enumerate(zip(manifest.buckets, manifest.checksums, got)):
        if tuple(want) != tuple(have):
            raise WeightSyncError(f"weights version {manifest.version}: bucket {i} ({spec.describe()}) fails its "
                                  f"checksum (expected {tuple(want)}, got {tuple(have)}): corrupted in transit, "
                                  "or overwritten by a later version")

