"""How a new policy version leaves the learner and reaches the rollout engines.

    sync = CopySync("cuda")                       # one transport, chosen by the process wiring
    handle = sync.publish(state_dict, version)    # learner side, once per version
    state = sync.receive(handle)                  # each consumer: {name: tensor}
    engine.update_weights(state, handle.version)

A `WeightHandle` is small and picklable: it is what crosses processes (the controller forwards it
and never holds the weights). Transports:

- `InProcessSync`: the handle carries the tensors themselves (a loop composed in one process).
- `ObjectStoreSync`: the tensors go into Ray's object store once, in the learner's process; the
  handle carries the `ObjectRef`. A Ray task or actor method given that ref as a top-level
  argument receives the state dict itself, so rollout workers read it without a `receive` call.
  The CPU path of a Ray run.
- `CopySync` (same process), `IpcSync` (another process on the node: CUDA IPC, or /dev/shm on
  CPU) and `BroadcastSync` (torch.distributed, nccl or gloo) move the weights in buckets
  (`kpop.weight_sync.buckets`) with a manifest and a checksum the receiver verifies; `receive`
  returns views into the buckets, valid until the next version is published.
"""

from kpop.weight_sync.buckets import DEFAULT_BUCKET_BYTES, BucketSpec, Manifest, TensorSpec
from kpop.weight_sync.core import InProcessSync, ObjectStoreSync, StateDict, WeightHandle, WeightSync, WeightSyncError
from kpop.weight_sync.transports import BroadcastSync, CopySync, IpcPayload, IpcSync

__all__ = [
    "DEFAULT_BUCKET_BYTES", "BroadcastSync", "BucketSpec", "CopySync", "InProcessSync", "IpcPayload", "IpcSync",
    "Manifest", "ObjectStoreSync", "StateDict", "TensorSpec", "WeightHandle", "WeightSync", "WeightSyncError",
]
