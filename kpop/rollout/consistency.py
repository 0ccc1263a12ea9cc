"""Training/inference mismatch metrics: how far the learner's recomputed logprobs are from the
logprobs the rollout engine sampled with, on the model's own tokens.

    m = logprob_consistency(train_logp, rollout_logp, loss_mask, phi=cfg.algorithm.kpop_phi)
    metrics.log(step, {f"rollout/{k}": v for k, v in m.items()})

`kpop_mask_rate` is the fraction of model tokens the KPop binary-KL test would drop at this phi.
"""

from __future__ import annotations

import torch

from kpop.algo.losses import kpop_keep


def logprob_consistency(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                        phi: float = 0.5) -> dict[str, float]:
    if train_logp.shape != rollout_logp.shape or mask.shape != train_logp.shape:
        raise ValueError(f"shapes differ: train {tuple(train_logp.shape)}, rollout {tuple(rollout_logp.shape)}, "
                         f"mask {tuple(mask.shape)}")
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return {"logprob_delta_mean": 0.0, "logprob_delta_max": 0.0, "kpop_mask_rate": 0.0, "tokens": 0}
    t, r = train_logp.detach().float()[m], rollout_logp.detach().float()[m]
    delta = (t - r).abs()
    dropped = (~kpop_keep(t, r, phi)).float().mean()
    return {"logprob_delta_mean": delta.mean().item(), "logprob_delta_max": delta.max().item(),
            "kpop_mask_rate": dropped.item(), "tokens": n}
