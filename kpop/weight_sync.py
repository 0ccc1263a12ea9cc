"""How a new policy version leaves the learner and reaches the rollout engines.

    sync = ObjectStoreSync()                      # one transport, chosen by the process wiring
    handle = sync.publish(state_dict, version)    # learner side, once per version
    state = sync.receive(handle)                  # each consumer

A `WeightHandle` is small and picklable: it is what crosses processes (the controller forwards it
and never holds the weights). Transports:

- `InProcessSync`: the handle carries the tensors themselves (a loop composed in one process).
- `ObjectStoreSync`: the tensors go into Ray's object store once, in the learner's process; the
  handle carries the `ObjectRef`. A Ray task or actor method given that ref as a top-level
  argument receives the state dict itself, so rollout workers read it without a `receive` call.

A GPU transport (CUDA IPC, NCCL broadcast) implements the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class WeightHandle:
    version: int
    payload: Any  # transport-specific: the state dict, an ObjectRef, an IPC handle, ...


class WeightSync(Protocol):
    def publish(self, state: StateDict, version: int) -> WeightHandle: ...

    def receive(self, handle: WeightHandle) -> StateDict: ...


class InProcessSync:
    def publish(self, state: StateDict, version: int) -> WeightHandle:
        return WeightHandle(version, dict(state))

    def receive(self, handle: WeightHandle) -> StateDict:
        return handle.payload


class ObjectStoreSync:
    """CPU transport through Ray's object store. The object is owned by the publishing process:
    it lives as long as that process and some consumer still holds the handle."""

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        import ray  # imported here: the learner and its tests run without Ray

        return WeightHandle(version, ray.put(dict(state)))

    def receive(self, handle: WeightHandle) -> StateDict:
        import ray

        return ray.get(handle.payload)
