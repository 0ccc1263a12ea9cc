"""The weight-sync interface, and the one transport that moves a plain state dict."""

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
    # The learner restarted from a checkpoint: this (older) version replaces whatever engines hold.
    # Any other handle older than an engine's weights is stale and refused.
    rewind: bool = False


class WeightSync(Protocol):
    def publish(self, state: StateDict, version: int) -> WeightHandle: ...

    def receive(self, handle: WeightHandle) -> StateDict: ...


class InProcessSync:
    """Same process, no buckets: the handle carries a snapshot of the tensors (one copy each, on
    their own device), taken at publish so the learner may step on before every engine has it."""

    def publish(self, state: StateDict, version: int) -> WeightHandle:
        with torch.no_grad():
            return WeightHandle(version, {k: v.detach().clone() for k, v in state.items()})

    def receive(self, handle: WeightHandle) -> StateDict:
        if not isinstance(handle.payload, dict):
            raise WeightSyncError(f"weights version {handle.version}: an in-process handle carries a state dict, "
                                  f"this one carries a {type(handle.payload).__name__} (another transport's handle)")
        return handle.payload
