"""The routed rows' expert layout in one launch for small row counts (decode), torch's path otherwise.

expert_layout(ids [N, k], E) -> (order int32 [N*k], counts int32 [E], offsets int32 [E+1]):
`order` lists the flat rows t*k + j grouped by expert, in token order inside each group (a stable
sort by expert); expert e owns order[offsets[e] : offsets[e+1]]. The same tensors as the torch path
(reference.sort_by_expert, then int32 and an exclusive prefix sum), bit for bit.

The torch path is ~7 kernels (a radix sort alone takes ~30 us on an H100 for 2,048 ids); under a
CUDA graph each node also costs host launch time. For M = N*k <= SMALL_ROWS rows a counting sort
does it in one launch: program p owns rows [p*BLOCK, (p+1)*BLOCK) and

    total  = histogram of all M ids,  before = histogram of the rows before its block
    start  = exclusive prefix sum of total + before  (the first slot of this block's rows, per expert)
    rank   = running count of each expert down the block (a [BLOCK, E] one-hot, cumsum over rows)
    order[start[e] + rank - 1] = row

Every program re-reads all M ids (a few KB, from L2) instead of waiting on the others: no grid-wide
barrier, no atomics, deterministic. That costs O(M) per program, hence the bound on M; training
batches (64k tokens x 8) keep the radix sort. No host sync; the outputs are the only allocations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.reference import sort_by_expert

SMALL_ROWS = 8192  # routed rows up to which the counting sort runs (each program reads them all)
MAX_EXPERTS = 256  # the one-hot tile is BLOCK x next_pow2(E): E = 256 leaves BLOCK = 16 rows
TILE = 4096  # one-hot elements per program: 32 registers a thread at 4 warps
MAX_BLOCK = 256  # rows per program when E is small: a short scan down the tile, more programs in parallel
MIN_BINS = 16  # padding bins for tiny E: no 1- or 2-wide histograms and tiles
HIST = 1024  # ids per histogram step
WARPS = 4


@triton.jit
def _sort_by_expert(ids, order, counts, offsets, M, E: tl.constexpr, EP: tl.constexpr,
                    BLOCK: tl.constexpr, HIST: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid * BLOCK
    h = tl.arange(0, HIST)
    # ids outside [0, E) take no slot (the caller guarantees none; this keeps the stores in bounds)
    before = tl.zeros([EP], tl.int32)
    for c0 in range(0, lo, HIST):
        v = tl.load(ids + c0 + h, mask=c0 + h < lo, other=-1)
        before += tl.histogram(v.to(tl.int32), EP, mask=(v >= 0) & (v < E))
    total = before
    for c0 in range(lo, M, HIST):
        v = tl.load(ids + c0 + h, mask=c0 + h < M, other=-1)
        total += tl.histogram(v.to(tl.int32), EP, mask=(v >= 0) & (v < E))
    ends = tl.cumsum(total, 0)  # inclusive: offsets[e + 1]
    start = ends - total + before

    rows = lo + tl.arange(0, BLOCK)
    v = tl.load(ids + rows, mask=rows < M, other=-1)
    e = tl.arange(0, EP)
    hit = (v[:, None] == e[None, :]) & (e < E)[None, :]
    rank = tl.cumsum(hit.to(tl.int32), 0)  # inclusive: this row and the block's earlier ones of its expert
    pos = tl.sum(tl.where(hit, start[None, :] + rank, 0), 1) - 1
    tl.store(order + pos, rows, mask=tl.sum(hit.to(tl.int32), 1) > 0)
    if pid == 0:
        tl.store(counts + e, total, mask=e < E)
        tl.store(offsets + 1 + e, ends, mask=e < E)
        tl.store(offsets + e, tl.zeros([EP], tl.int32), mask=e == 0)


def fits_counting_sort(rows: int, num_experts: int) -> bool:
    return 0 < rows <= SMALL_ROWS and num_experts <= MAX_EXPERTS


def launch_config(num_experts: int) -> tuple[int, int]:
    """(EP bins, BLOCK rows per program)."""
    EP = max(MIN_BINS, triton.next_power_of_2(num_experts))
    return EP, min(MAX_BLOCK, TILE // EP)


def sort_small(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The counting-sort kernel (see the module docstring); any M, but O(M) work per program."""
    flat = ids.reshape(-1)
    M = flat.numel()
    EP, BLOCK = launch_config(num_experts)
    order = torch.empty(M, dtype=torch.int32, device=ids.device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    _sort_by_expert[(triton.cdiv(M, BLOCK),)](flat, order, counts, offsets, M, E=num_experts, EP=EP,
                                              BLOCK=BLOCK, HIST=HIST, num_warps=WARPS)
    return order, counts, offsets


def sort_torch(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference sort in the kernel's dtypes: a radix sort, any size."""
    order, counts = sort_by_expert(ids, num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    return order.to(torch.int32), counts, offsets


def expert_layout(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, counts, offsets) of the routed rows; both paths give the same tensors."""
    if fits_counting_sort(ids.numel(), num_experts):
        return sort_small(ids, num_experts)
    return sort_torch(ids, num_experts)
