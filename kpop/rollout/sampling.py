"""Batched sampling on the logits' device: temperature, top-k, top-p, per-request seeds, and the
chosen token's logprob, with nothing read back to the host.

    batch = SamplingBatch.of(params, seeds, steps, device)   # one host-to-device copy
    tokens, logprobs = sample(logits, batch)                 # [B] int64, [B] fp32, on the device

Rows are sampled by the exponential race (`argmax p_i / E_i`, E_i ~ Exp(1)). The noise E_i is a
hash of (the request's seed, the index of the token in its completion, i), not a draw from a
stateful generator: a seeded request gives the same tokens alone or in any batch, after a
preemption re-prefills it, and on CPU or GPU alike, and the whole batch draws its noise in a few
elementwise kernels whatever its seeds. Unseeded requests get a seed from the engine's generator.

The returned logprob is that of the sampled token under `log_softmax(logits / temperature)`
(raw logits at temperature 0), before top-k/top-p truncation: see kpop/rollout/engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kpop.rollout.engine import SamplingParams

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32). Products may
    pass 2^63 and wrap; only their low 32 bits are kept, which wrapping leaves exact."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def race_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab] fp32, a pure function of (seed, step, token id) per element."""
    s = seeds.long()
    key = _fmix32((s & _M32) ^ _fmix32(((s >> 32) & _M32) ^ _fmix32((steps.long() & _M32) ^ 0x5BD1E995)))
    ids = (torch.arange(vocab, device=seeds.device, dtype=torch.long) * 0x9E3779B1) & _M32
    h = _fmix32(key[:, None] ^ ids[None, :])
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), never 0 or 1
    return -torch.log(u)


def processed_logprobs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T) per row (T = 0 rows use T = 1: greedy reports the raw distribution)."""
    t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return torch.log_softmax(logits.float() / t[:, None], dim=-1)


def truncate(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set everything outside each row's top-k / top-p nucleus to -inf (k = 0 / p = 1: off).
    The most likely token always survives."""
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    rank = torch.arange(logprobs.shape[-1], device=logprobs.device)[None]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(-1) - probs  # nucleus: keep a token while the mass before it is < p
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.empty_like(logprobs).scatter_(-1, order, sorted_lp)


@dataclass
class SamplingBatch:
    """Per-row sampling settings on the device, plus what the host already knows about them (which
    kernels a step needs), so `sample` never reads the device back."""

    temperature: torch.Tensor  # fp32 [B]
    top_k: torch.Tensor  # int64 [B]
    top_p: torch.Tensor  # fp32 [B]
    seeds: torch.Tensor  # int64 [B]
    steps: torch.Tensor  # int64 [B]: index of the token being sampled in each completion
    any_random: bool  # some row has temperature > 0
    any_truncation: bool  # some sampled row has top-k or top-p on

    @classmethod
    def of(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
           device: torch.device | str = "cpu") -> "SamplingBatch":
        if not len(params) == len(seeds) == len(steps):
            raise ValueError(f"SamplingBatch: {len(params)} params, {len(seeds)} seeds, {len(steps)} steps")
        ints = torch.tensor([[p.top_k for p in params], list(seeds), list(steps)], dtype=torch.long)
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params]], dtype=torch.float32)
        ints, floats = ints.to(device, non_blocking=True), floats.to(device, non_blocking=True)
        random = [p for p in params if p.temperature > 0]
        return cls(temperature=floats[0], top_k=ints[0], top_p=floats[1], seeds=ints[1], steps=ints[2],
                   any_random=bool(random), any_truncation=any(p.top_k > 0 or p.top_p < 1.0 for p in random))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token ids int64 [B], logprobs fp32 [B]), on the logits' device."""
    B, V = logits.shape
    if batch.temperature.shape != (B,):
        raise ValueError(f"sample: {B} logit rows but settings for {tuple(batch.temperature.shape)[0]}")
    logprobs = processed_logprobs(logits, batch.temperature)
    tokens = logprobs.argmax(-1)
    if batch.any_random:
        scores = truncate(logprobs, batch.top_k, batch.top_p) if batch.any_truncation else logprobs
        raced = (scores - torch.log(race_noise(batch.seeds, batch.steps, V))).argmax(-1)
        tokens = torch.where(batch.temperature > 0, raced, tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
