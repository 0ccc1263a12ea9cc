"""Capture a GPU computation in a CUDA graph the way the engine does, checking on the way that it
never reads the device back (a read inside a decode step would stall every step on the host)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def capture_without_syncs(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm `step` up on a side stream (kernel compiles stay out of the capture), run it once with
    torch's sync debug mode on "error" (a device-to-host read raises), then capture it; returns the
    graph and the captured call's outputs (the tensors each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
