"""Triton router for inference: sigmoid, group-limited top-k and the expert weights in one kernel.

Each program routes BT tokens, a [BT, E] tile of router logits in registers:

    s       = sigmoid(logits)                   libdevice expf and an IEEE division on the GPU, as
                                                torch's CUDA sigmoid computes it
    biased  = s + bias
    group g = top1 + top2 of biased over its E / n_group experts
    keep      the topk_group best groups        repeated max + first index
    ids       the k best kept experts           repeated max + first index, best first
    w       = s[ids] / (sum + 1e-20) * scaling  (no normalisation for k = 1)

Ties resolve to the lowest index (a group, an expert). torch.topk leaves the order of ties
unspecified, so on inputs with exact ties the two may pick different (equally valid) experts; on
tie-free inputs the ids are torch's, in torch's order, and the weights differ from torch's at most
by the rounding of the k-term sum (a few ulps). No host sync; the outputs are the only allocations.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

if os.environ.get("TRITON_INTERPRET") == "1":
    libdevice = None  # the interpreter has no libdevice: PRECISE is off there
else:
    from triton.language.extra import libdevice


@triton.jit
def _sigmoid(v, PRECISE: tl.constexpr):
    if PRECISE:
        e = libdevice.exp(-v)
    else:
        e = tl.exp(-v)
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), 1.0 + e)


@triton.jit
def _first_max(v, idx, taken, N_IDX: tl.constexpr):
    """Per row: the largest value of v not yet taken, and its lowest index -> (max, index, one-hot)."""
    cand = tl.where(taken, float("-inf"), v)
    m = tl.max(cand, 1)
    pick = tl.min(tl.where((cand == m[:, None]) & ~taken, idx[None, :], N_IDX), 1)
    return m, pick, idx[None, :] == pick[:, None]


@triton.jit
def _route(
    logits, bias, ids_out, w_out, N, stride_l, scaling,
    E: tl.constexpr, EP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, TOPG: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, PRECISE: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    e = tl.arange(0, EP)
    gi = tl.arange(0, GP)
    ki = tl.arange(0, KP)
    t_ok = t < N
    e_ok = e < E
    lg = tl.load(logits + t[:, None].to(tl.int64) * stride_l + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
    s = _sigmoid(lg.to(tl.float32), PRECISE)
    biased = s + tl.load(bias + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    grp = e // (E // G)  # >= G for the padding experts: in no group, never chosen

    # group scores: the sum of each group's two best biased scores (a repeated best counts twice,
    # as in torch's top-2)
    gs = tl.full((BT, GP), float("-inf"), tl.float32)
    for g in tl.static_range(G):
        out_g = tl.broadcast_to((grp != g)[None, :], (BT, EP))
        top1, _, hit1 = _first_max(biased, e, out_g, EP)
        top2, _, _ = _first_max(biased, e, out_g | hit1, EP)
        gs = tl.where(gi[None, :] == g, (top1 + top2)[:, None], gs)

    # the topk_group best groups, then their experts
    g_taken = tl.broadcast_to((gi >= G)[None, :], (BT, GP))
    keep = tl.zeros((BT, EP), tl.int1)
    for _ in tl.static_range(TOPG):
        _, pick, hit = _first_max(gs, gi, g_taken, GP)
        g_taken = g_taken | hit
        keep = keep | (grp[None, :] == pick[:, None])

    # the k best experts of the kept groups, best first, and their unbiased scores
    taken = ~keep
    ids = tl.zeros((BT, KP), tl.int32)
    w = tl.zeros((BT, KP), tl.float32)
    for j in tl.static_range(K):
        _, pick, hit = _first_max(biased, e, taken, EP)
        taken = taken | hit
        ids = tl.where(ki[None, :] == j, pick[:, None], ids)
        w = tl.where(ki[None, :] == j, tl.sum(tl.where(hit, s, 0.0), 1)[:, None], w)
    if K > 1:
        w = tl.math.div_rn(w, (tl.sum(w, 1) + 1e-20)[:, None])
    w = w * scaling
    out = t[:, None].to(tl.int64) * K + ki[None, :]
    mask = t_ok[:, None] & (ki < K)[None, :]
    tl.store(ids_out + out, ids.to(tl.int64), mask=mask)
    tl.store(w_out + out, w, mask=mask)


def route_triton(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int,
                 scaling: float) -> tuple[Tensor, Tensor]:
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.long, device=logits.device)
    w = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    if N == 0:
        return ids, w
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    EP = triton.next_power_of_2(E)
    BT = max(1, min(64, 1024 // EP))  # ~1k scores a program: 4 programs of 64 tokens at E=256
    _route[(triton.cdiv(N, BT),)](
        logits, bias, ids, w, N, logits.stride(0), float(scaling),
        E=E, EP=EP, G=n_group, GP=triton.next_power_of_2(n_group), TOPG=topk_group,
        K=k, KP=triton.next_power_of_2(k), BT=BT, PRECISE=libdevice is not None,
        num_warps=4, enable_fp_fusion=False,
    )
    return ids, w
