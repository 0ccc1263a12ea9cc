"""How a new policy version leaves the learner and reaches the rollout engines.

    sync = CopySync("cuda")                       # one transport, chosen by the process wiring
    handle = sync.publish(state_dict, version)    # learner side, once per version
    state = sync.receive(handle)                  # each consumer: {name: tensor}
    engine.update_weights(state, handle.version)   # or, in one call: engine.receive_weights(handle, sync)

A `WeightHandle` is small and picklable: it is what crosses processes (the controller forwards it
and never holds the weights). Transports:

- `InProcessSync`: the handle carries the tensors themselves (a loop composed in one process).
- `ObjectStoreSync`: buckets go into Ray's object store once, from the learner's process; the
  handle carries the `ObjectRef`. The CPU path of a Ray run.
- `CopySync` (same process), `IpcSync` (another process on the node: CUDA IPC, or /dev/shm on
  CPU) and `BroadcastSync` (torch.distributed, nccl or gloo) move the weights in buckets
  (`kpop.weight_sync.buckets`) with a manifest and a checksum the receiver verifies; `receive`
  returns views into the buckets, valid until the next version is published.
"""

from kpop.weight_sync.buckets import DEFAULT_BUCKET_BYTES, BucketSpec, Manifest, TensorSpec
from kpop.weight_sync.core import InProcessSync, StateDict, WeightHandle, WeightSync, WeightSyncError
from kpop.weight_sync.transports import BroadcastSync, CopySync, IpcPayload, IpcSync, ObjectStoreSync

TRANSPORTS = {"inprocess": InProcessSync, "copy": CopySync, "object_store": ObjectStoreSync, "ipc": IpcSync}


def make_sync(kind: str, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str | None = None) -> WeightSync:
    """A transport by name (`BroadcastSync` needs a process group: build it directly). `device`:
    where `copy` and `ipc` keep their buckets (None: the learner's tensors' device)."""
    if kind == "inprocess":
        return InProcessSync()
    if kind == "object_store":
        return ObjectStoreSync(bucket_bytes)
    if kind in ("copy", "ipc"):
        return TRANSPORTS[kind](device, bucket_bytes)
    raise ValueError(f"unknown weight-sync transport {kind!r}: expected one of {sorted(TRANSPORTS)}")


__all__ = [
    "DEFAULT_BUCKET_BYTES", "BroadcastSync", "BucketSpec", "CopySync", "InProcessSync", "IpcPayload", "IpcSync",
    "Manifest", "ObjectStoreSync", "StateDict", "TRANSPORTS", "TensorSpec", "WeightHandle", "WeightSync",
    "WeightSyncError", "make_sync",
]
