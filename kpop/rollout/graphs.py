"""CUDA-graph decode steps for the embedded engine: one captured graph per batch-size bucket.

    graphs = DecodeGraphs(model, cache, max_batch=256)
    logits, routes = graphs.decode(token_ids, slots)     # every slot cached, one new token each

A decode step of a small-batch MoE policy is thousands of short kernels; launching them one by one
costs more host time than the GPU spends running them. A graph replays the whole step (embedding,
every layer, the LM head) from one launch. Its shapes are fixed, so a batch is padded up to the
next bucket: padding rows use the cache's scratch slot and scratch block, so they never touch a
sequence's state. Everything a step varies (token ids, slots, positions, cache rows) goes through
one small host-to-device copy into the graph's input buffer, except token ids already on the
device (the previous step's samples, when the engine overlaps steps), copied there on the device;
block tables are gathered inside the graph from the cache's device tables, which the cache updates
in place.

Graphs are captured at the first decode step (every bucket, largest first) and hold the
model's parameters and the cache by address, so in-place weight updates (`load_into`) need no
recapture. On CPU, or if capture fails, the engine steps eagerly.
"""

from __future__ import annotations

import bisect

import torch

from kpop.policy.cache import HybridCache
from kpop.policy.model import StepContext


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 32 to 256, of 64 beyond, and `max_batch` itself:
    padding wastes at most ~1/8 of a step above 64."""
    sizes = {1, 2, 4, 8, max_batch}
    sizes.update(range(16, 65, 8))
    sizes.update(range(96, 257, 32))
    sizes.update(range(320, max_batch + 1, 64))
    return sorted(s for s in sizes if s <= max_batch)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache: HybridCache, max_batch: int,
                 buckets: list[int] | None = None) -> None:
        if not cache.device.type == "cuda":
            raise ValueError("DecodeGraphs needs a CUDA cache")
        self.model, self.cache = model, cache
        self.buckets = sorted(buckets or default_buckets(max_batch))
        if self.buckets[-1] < max_batch:
            raise ValueError(f"the largest bucket {self.buckets[-1]} is below max_batch {max_batch}")
        B = self.buckets[-1]
        # rows: token id, slot, position, cache row; padding columns point at the scratch slot/block
        self.pad = torch.tensor([0, cache.scratch_slot, 0, cache.scratch_block * cache.block_size], dtype=torch.long)
        self.inputs = self.pad[:, None].repeat(1, B).to(cache.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pool = None
        self.failed: str | None = None  # why capture failed (then the engine steps eagerly)

    def _step(self, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, slots, positions, locations = self.inputs[:, :B]
        ctx = StepContext(
            slots=slots, query_lens=[1] * B, cu_seqlens=None, locations=locations, fresh_tokens=None,
            fresh_cu_seqlens=None, cached_tokens=None, cached_block_table=self.cache.tables[slots],
            cached_seq_lens=(positions + 1).to(torch.int32), decode=True,
        )
        return self.model.step_with_context(ids, positions, ctx, self.cache)

    def _capture(self, B: int) -> None:
        self.inputs.copy_(self.pad[:, None].expand_as(self.inputs))  # warm-up rows write to scratch only
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels and settles the allocator before capture
                self._step(B)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a learner sharing the GPU from another thread keeps running during capture
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._step(B)
        self.pool = graph.pool()
        self.graphs[B], self.outputs[B] = graph, out

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the smaller graphs reuse its memory pool). Done at
        the first decode step: capturing mid-rollout, as a batch drains through the buckets, would
        stall it a few hundred milliseconds per bucket."""
        for B in reversed(self.buckets):
            if B not in self.graphs:
                self._capture(B)

    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    @torch.no_grad()
    def decode(self, token_ids: list[int] | torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step of `slots` (each already cached) fed `token_ids` (host ids, or a device
        tensor such as the previous step's sampled tokens, copied on the device): (fp32 logits
        [n, V], expert ids [n, MoE layers, top_k] or None), views into the graph's outputs valid
        until the next call. Reserves and advances the cache like `forward_step`."""
        n = len(slots)
        cache = self.cache
        cache.reserve(slots, [1] * n)
        positions = [cache.seq_len(s) for s in slots]
        locations = cache.host_locations(slots, [1] * n)
        cache.flush()
        B = self.bucket(n)
        if not self.graphs:
            self.capture_all()
        on_device = isinstance(token_ids, torch.Tensor)
        host = self.pad[:, None].repeat(1, B)
        host[:, :n] = torch.stack([torch.zeros(n, dtype=torch.long) if on_device else torch.tensor(token_ids),
                                   torch.tensor(slots), torch.tensor(positions), locations])
        # a fresh pinned buffer per step: the caching host allocator reuses it only once this copy ran
        self.inputs[:, :B].copy_(host.pin_memory(), non_blocking=True)
        if on_device:
            self.inputs[0, :n].copy_(token_ids)
        self.graphs[B].replay()
        cache.advance(slots, [1] * n)
        logits, routes = self.outputs[B]
        return logits[:n], None if routes is None else routes[:n]
