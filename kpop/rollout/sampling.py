"""Batched, per-request seeded sampling with temperature, top-k and top-p, in torch.

    tokens, logprobs = sample(logits, params, generators)

Each row has its own `SamplingParams` and its own `torch.Generator` (or None = the shared one
passed as `default`). Rows are sampled by the exponential race (`argmax p_i / E_i`, E_i ~ Exp(1)),
which draws the same V numbers per step whatever the batch looks like, so a seeded request gives
the same tokens alone or in a batch of 32.

The returned logprob is that of the sampled token under `log_softmax(logits / temperature)`
(raw logits at temperature 0), before top-k/top-p truncation: see kpop/rollout/engine.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kpop.rollout.engine import SamplingParams


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


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token ids int64 [B], logprobs fp32 [B])."""
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"sample: {B} logit rows but {len(params)} params and {len(generators)} generators")
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    logprobs = processed_logprobs(logits, temps)
    tokens = logprobs.argmax(-1)
    stochastic = [i for i, p in enumerate(params) if p.temperature > 0]
    if stochastic:
        idx = torch.tensor(stochastic, device=dev)
        top_k = torch.tensor([params[i].top_k for i in stochastic], device=dev)
        top_p = torch.tensor([params[i].top_p for i in stochastic], dtype=torch.float32, device=dev)
        probs = truncate(logprobs[idx], top_k, top_p).exp()
        noise = torch.stack([
            torch.empty(V, dtype=torch.float32).exponential_(generator=generators[i] or default)
            for i in stochastic
        ]).to(dev)
        tokens[idx] = (probs / noise).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
