"""Test helper: how far the learner's recomputed logprobs are from the logprobs the rollout
engine sampled with, on the model's own tokens.

    m = trajectory_consistency(model, traj, phi=0.1)
    assert m["logprob_delta_max"] < 1e-4 and m["kpop_mask_rate"] == 0.0

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


def trajectory_consistency(model: torch.nn.Module, traj, phi: float = 0.1) -> dict[str, float]:
    """The learner's full forward over `traj.token_ids` against its rollout logprobs."""
    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0], -1)[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logprob_consistency(lp, torch.tensor(traj.logprobs[1:]), torch.tensor(traj.loss_mask[1:]), phi=phi)
