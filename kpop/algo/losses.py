"""Policy-gradient losses (PPO-clip, GSPO, LPO) with off-policy and training-inference correction.

All tensors are flat over the packed tokens of a batch, shape [T]:
  logp   log pi_theta(y_t)            current policy, carries the gradient
  prox   log pi_prox(y_t)             proximal policy: the learner's own recompute at theta_old (detached)
  behav  log pi_behav(y_t)            behaviour policy: the rollout engine's logprobs (maybe stale)
  adv    advantage of y_t's sample    (a sequence advantage broadcast over its tokens)
  mask   bool, True on loss tokens    (model-generated tokens only)
  units  long, ratio unit of y_t      (PPO: ignored; GSPO: sequence id; LPO: sentence id)

k_t = pi_prox / pi_behav is the training-inference ratio at theta_old (in async RL it also holds
the staleness). It drives both corrections:
  off-policy (decoupled PPO): the clip ratio is pi_theta/pi_prox and the surrogate is weighted by
      min(k, cap); without it the ratio is pi_theta/pi_behav and nothing is weighted.
  IcePop:  weight k if alpha <= k <= beta, else the token is dropped (M(k) of Ring-1T).
  KPop:    drop the token unless binary KL(p||q) <= phi and KL(q||p) <= phi, p = pi_prox, q = pi_behav.
Dropped tokens still count in the normaliser (1 / sum|y|), as in IcePop.

`token_decisions` says per token what the loss does with it (`TokenDecision`); the learner passes
those decisions to `policy_loss`, so what it archives per token is exactly the mask the loss used.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

PROB_EPS = 1e-6


class TokenDecision(enum.IntEnum):
    """What the learner did with one token; archived per token (`decisions`) for the viewer and
    `kpop replay --rescore`. Values are stored: never renumber a member, only add new ones."""

    KEEP = 0  # a loss token the loss trained on
    MASK_KL = 1  # KPop: binary KL between learner and rollout token probability above kpop_phi
    MASK_RATIO = 2  # IcePop: learner / rollout probability ratio outside [icepop_alpha, icepop_beta]
    MASK_STALE = 3  # its trajectory was older than the staleness bound allows (dropped)
    NOT_TRAINED = 4  # not a loss token, or its trajectory was not trained on (failed, filtered)

    @property
    def reason(self) -> str:
        """One line for people (the viewer's hover, reports)."""
        return _REASONS[self]


_REASONS = {
    TokenDecision.KEEP: "trained on",
    TokenDecision.MASK_KL: "masked by KPop: binary KL between learner and rollout probability above kpop_phi",
    TokenDecision.MASK_RATIO: "masked by IcePop: learner/rollout probability ratio outside the window",
    TokenDecision.MASK_STALE: "masked: the trajectory was staler than the staleness bound allows",
    TokenDecision.NOT_TRAINED: "not trained: not a model token, or the trajectory was not used",
}


def kpop_keep(train_logp: torch.Tensor, infer_logp: torch.Tensor, phi: float) -> torch.Tensor:
    """bool: binary KL between the token probabilities is <= phi in both directions."""
    p = train_logp.exp().clamp(PROB_EPS, 1 - PROB_EPS)
    q = infer_logp.exp().clamp(PROB_EPS, 1 - PROB_EPS)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()

    return (kl(p, q) <= phi) & (kl(q, p) <= phi)


def icepop_keep(train_logp: torch.Tensor, infer_logp: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """bool: alpha <= pi_train / pi_infer <= beta."""
    k = (train_logp - infer_logp).exp()
    return (k >= alpha) & (k <= beta)


def token_decisions(prox: torch.Tensor, behav: torch.Tensor, mask: torch.Tensor, spec: "LossSpec") -> torch.Tensor:
    """int8 [T] of `TokenDecision`: the correction's verdict on each loss token (`mask`), NOT_TRAINED
    elsewhere. `prox` / `behav` as in `policy_loss` (learner / rollout logprobs)."""
    mask = mask.bool()
    out = torch.where(mask, int(TokenDecision.KEEP), int(TokenDecision.NOT_TRAINED)).to(torch.int8)
    if spec.correction == "kpop":
        masked, why = ~kpop_keep(prox, behav, spec.kpop_phi), TokenDecision.MASK_KL
    elif spec.correction == "icepop":
        masked, why = ~icepop_keep(prox, behav, spec.icepop_alpha, spec.icepop_beta), TokenDecision.MASK_RATIO
    elif spec.correction == "none":
        return out
    else:
        raise ValueError(f"unknown correction {spec.correction!r}: expected none, icepop or kpop")
    return out.masked_fill(mask & masked, int(why))


def dropped_decisions(loss_mask: Sequence[int], stale: bool) -> list[int]:
    """Decisions for a trajectory the learner dropped before the loss: MASK_STALE on its loss tokens
    when it was dropped for staleness, NOT_TRAINED everywhere otherwise."""
    masked = int(TokenDecision.MASK_STALE if stale else TokenDecision.NOT_TRAINED)
    return [masked if m else int(TokenDecision.NOT_TRAINED) for m in loss_mask]


def unit_mean(x: torch.Tensor, units: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the mean of x over the masked tokens of its unit, and that unit's masked size."""
    _, dense = torch.unique(units, return_inverse=True)
    n = int(dense.max()) + 1 if dense.numel() else 0
    m = mask.to(x.dtype)
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, dense, x * m)
    size = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, dense, m)
    return (total / size.clamp(min=1))[dense], size[dense]


@dataclass(frozen=True)
class LossSpec:
    """The algorithm section of the run config, as far as the loss needs it."""

    loss: Literal["ppo", "gspo", "lpo"] = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    correction: Literal["none", "icepop", "kpop"] = "kpop"
    kpop_phi: float = 0.5
    icepop_alpha: float = 0.5
    icepop_beta: float = 5.0
    off_policy: bool = True
    off_policy_cap: float = 5.0  # clip of the behaviour importance weight pi_prox / pi_behav

    @classmethod
    def from_config(cls, algo) -> "LossSpec":
        return cls(**{f: getattr(algo, f) for f in cls.__dataclass_fields__ if hasattr(algo, f)})


def policy_loss(
    logp: torch.Tensor,
    prox: torch.Tensor,
    behav: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    units: torch.Tensor,
    spec: LossSpec,
    norm: float | None = None,
    decisions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss to minimise and additive statistics (0-dim tensors; see `summarize`). `norm` is the normaliser of the
    whole optimiser step when the batch is split into micro-batches: loss tokens (PPO, LPO) or
    sequences (GSPO); None = this batch's own. `decisions` (`token_decisions` of these tokens, for
    a caller that records them) is the mask used; None = computed here."""
    if not (logp.shape == prox.shape == behav.shape == adv.shape == mask.shape == units.shape) or logp.dim() != 1:
        shapes = [tuple(t.shape) for t in (logp, prox, behav, adv, mask, units)]
        raise ValueError(f"logp, prox, behav, adv, mask, units must all be flat [T], got {shapes}")
    mask = mask.bool()
    prox, behav = prox.detach(), behav.detach()
    log_k = prox - behav
    if decisions is None:
        decisions = token_decisions(prox, behav, mask, spec)
    elif decisions.shape != mask.shape:
        raise ValueError(f"decisions must be flat [T] like mask, got {tuple(decisions.shape)}")
    keep = mask & (decisions == int(TokenDecision.KEEP))
    weighted = spec.off_policy or spec.correction == "icepop"
    old = prox if spec.off_policy else behav

    log_ratio = logp - old
    if spec.loss == "ppo":
        size = torch.ones_like(logp)
    elif spec.loss in ("gspo", "lpo"):
        # geometric mean over the unit's kept tokens: sequence (GSPO) or sentence (LPO) ratio
        log_ratio, size = unit_mean(log_ratio, units, keep)
        log_k, _ = unit_mean(log_k, units, keep)
    else:
        raise ValueError(f"unknown loss {spec.loss!r}: expected ppo, gspo or lpo")
    ratio = log_ratio.exp()
    weight = torch.ones_like(ratio)
    if weighted:
        weight = log_k.exp()
        if spec.correction != "icepop":  # IcePop's band already bounds k
            weight = weight.clamp(max=spec.off_policy_cap)
    clipped_ratio = ratio.clamp(1 - spec.clip_low, 1 + spec.clip_high)
    surrogate = weight * torch.minimum(ratio * adv, clipped_ratio * adv)
    if spec.loss == "gspo":  # each sequence counts once, whatever its length
        surrogate = surrogate / size.clamp(min=1)
        default_norm = float(len(torch.unique(units[mask])))
    else:
        default_norm = float(mask.sum())
    norm = default_norm if norm is None else norm
    loss = -(surrogate * keep).sum() / max(norm, 1.0)

    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1 + spec.clip_high)) | ((adv < 0) & (ratio < 1 - spec.clip_low))
        # device scalars, read by `summarize` after the step: a read here would stall the GPU
        # between each micro-batch's forward and backward
        dlogp = torch.where(mask, (prox - behav).abs(), 0.0)
        stats = {
            "tokens": mask.sum().float(),
            "masked": (mask & ~keep).sum().float(),
            "clipped": (clipped & keep).sum().float(),
            "dlogp_sum": dlogp.sum(),
            "dlogp_max": dlogp.max() if dlogp.numel() else dlogp.new_zeros(()),
            "weight_sum": (weight * keep).sum(),
            "kept": keep.sum().float(),
        }
    return loss, stats


def summarize(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Merge micro-batch statistics into rates: mask_rate, clip_frac, dlogp_mean/max, weight_mean."""
    stats = [{k: float(v) for k, v in s.items()} for s in stats]
    tot = {k: sum(s[k] for s in stats) for k in ("tokens", "masked", "clipped", "dlogp_sum", "weight_sum", "kept")}
    tokens, kept = max(tot["tokens"], 1.0), max(tot["kept"], 1.0)
    return {
        "mask_rate": tot["masked"] / tokens,
        "clip_frac": tot["clipped"] / kept,
        "dlogp_mean": tot["dlogp_sum"] / tokens,
        "dlogp_max": max((s["dlogp_max"] for s in stats), default=0.0),
        "weight_mean": tot["weight_sum"] / kept,
        "loss_tokens": tot["tokens"],
    }


# -- LPO linguistic units ----------------------------------------------------------------------

PAUSE = re.compile(r"[,.;:!?\n，。；：！？、…]\s*$")


def linguistic_units(token_texts: Sequence[str], loss_mask: Sequence[bool] | None = None) -> list[int]:
    """Sentence id per token, from each token's detokenized text: a unit ends at a token that ends in
    pause punctuation (, . ; : ! ? newline, CJK pauses) and at every loss-mask change (a model turn
    never shares a unit with the tool output around it). Ids start at 0 and rise by one per unit."""
    if loss_mask is not None and len(loss_mask) != len(token_texts):
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(token_texts)} tokens")
    ids, unit, prev_end = [], 0, False
    for t, text in enumerate(token_texts):
        if t and (prev_end or (loss_mask is not None and bool(loss_mask[t]) != bool(loss_mask[t - 1]))):
            unit += 1
        ids.append(unit)
        prev_end = bool(PAUSE.search(text))
    return ids
