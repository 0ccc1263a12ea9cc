"""The weight-sync interface and the two transports that move a plain state dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

StateDict = Mapping[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """Weights arrived wrong: a failed checksum, a stale handle, or a manifest that does not match."""


@dataclass(frozen=True)
class WeightHandle:
    version: int
    payload: Any  # transport-specific: the state dict, an ObjectRef, a manifest and IPC handles, ...


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
