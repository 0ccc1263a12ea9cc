"""Losses and corrections against direct loop computations of their formulas (REFERENCE.md 2)."""

import math

import pytest
import torch

from kpop.algo.losses import LossSpec, icepop_keep, kpop_keep, linguistic_units, policy_loss, summarize


def _batch(seed=0, T=40):
    g = torch.Generator().manual_seed(seed)
    behav = -torch.rand(T, generator=g) * 3 - 0.01
    prox = behav + torch.randn(T, generator=g) * 0.6
    logp = prox + torch.randn(T, generator=g) * 0.3
    seq = torch.arange(T) * 3 // T  # three sequences
    adv_seq = torch.tensor([1.5, -0.7, 0.4])
    adv = adv_seq[seq]
    mask = torch.rand(T, generator=g) > 0.2
    units = seq * 100 + torch.arange(T) // 4  # sentence ids nested in sequences
    return logp, prox, behav, adv, mask, seq, units


def _binary_kl(a, b):
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def _keep(spec, p_log, q_log):
    k = math.exp(p_log - q_log)
    if spec.correction == "icepop":
        return spec.icepop_alpha <= k <= spec.icepop_beta
    if spec.correction == "kpop":
        p = min(max(math.exp(p_log), 1e-6), 1 - 1e-6)
        q = min(max(math.exp(q_log), 1e-6), 1 - 1e-6)
        return _binary_kl(p, q) <= spec.kpop_phi and _binary_kl(q, p) <= spec.kpop_phi
    return True


def _reference(spec, logp, prox, behav, adv, mask, units):
    """Sum over units (a token is its own unit for PPO) of w_u * min(r_u A, clip(r_u) A) * |u|."""
    lp, px, bh, ad, mk, un = (t.tolist() for t in (logp, prox, behav, adv, mask, units))
    keep = [mk[t] and _keep(spec, px[t], bh[t]) for t in range(len(lp))]
    old = px if spec.off_policy else bh
    groups = {}
    for t in range(len(lp)):
        if keep[t]:
            groups.setdefault(t if spec.loss == "ppo" else un[t], []).append(t)
    total = 0.0
    for toks in groups.values():
        log_r = sum(lp[t] - old[t] for t in toks) / len(toks)
        log_k = sum(px[t] - bh[t] for t in toks) / len(toks)
        r, a = math.exp(log_r), ad[toks[0]]
        w = 1.0
        if spec.correction == "icepop":
            w = math.exp(log_k)
        elif spec.off_policy:
            w = min(math.exp(log_k), spec.off_policy_cap)
        surr = w * min(r * a, min(max(r, 1 - spec.clip_low), 1 + spec.clip_high) * a)
        total += surr if spec.loss == "gspo" else surr * len(toks)
    if spec.loss == "gspo":
        n = len({un[t] for t in range(len(lp)) if mk[t]})
    else:
        n = sum(mk)
    return -total / n


@pytest.mark.parametrize("loss", ["ppo", "gspo", "lpo"])
@pytest.mark.parametrize("correction", ["none", "icepop", "kpop"])
@pytest.mark.parametrize("off_policy", [True, False])
def test_loss_matches_loop_formula(loss, correction, off_policy):
    logp, prox, behav, adv, mask, seq, units = _batch()
    spec = LossSpec(loss=loss, correction=correction, off_policy=off_policy, kpop_phi=0.1, clip_low=0.1, clip_high=0.15)
    unit_ids = seq if loss == "gspo" else units
    got, stats = policy_loss(logp, prox, behav, adv, mask, unit_ids, spec)
    want = _reference(spec, logp, prox, behav, adv, mask, unit_ids)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert stats["tokens"] == mask.sum().item()


def test_gradient_flows_only_to_kept_tokens():
    logp, prox, behav, adv, mask, seq, units = _batch(seed=1)
    logp = prox.clone().requires_grad_(True)  # ratio 1: nothing clipped
    spec = LossSpec(loss="ppo", correction="kpop", kpop_phi=0.05)
    loss, _ = policy_loss(logp, prox, behav, adv, mask, seq, spec)
    loss.backward()
    keep = mask & kpop_keep(prox, behav, 0.05)
    assert 0 < keep.sum() < mask.sum()  # the test batch exercises both sides of the mask
    assert (logp.grad[~keep] == 0).all() and (logp.grad[keep] != 0).all()


def test_kpop_and_icepop_masks_match_definitions():
    _, prox, behav, *_ = _batch(seed=2, T=200)
    ice = icepop_keep(prox, behav, 0.5, 5.0)
    kp = kpop_keep(prox, behav, 0.2)
    for t in range(200):
        assert ice[t].item() == (0.5 <= math.exp(prox[t] - behav[t]) <= 5.0)
        assert kp[t].item() == _keep(LossSpec(correction="kpop", kpop_phi=0.2), prox[t].item(), behav[t].item())
    # identical policies are always kept; certain-vs-unlikely is never kept
    assert kpop_keep(torch.tensor([-0.3]), torch.tensor([-0.3]), 1e-9).item()
    assert not kpop_keep(torch.tensor([0.0]), torch.tensor([-20.0]), 2.0).item()


def test_explicit_norm_splits_like_the_whole_batch():
    logp, prox, behav, adv, mask, seq, units = _batch(seed=3)
    spec = LossSpec(loss="lpo", correction="none")
    whole, _ = policy_loss(logp, prox, behav, adv, mask, units, spec)
    n = float(mask.sum())
    cut = int((seq == 0).sum())
    a, b = slice(0, cut), slice(cut, None)  # split on a sequence boundary
    parts = [policy_loss(logp[s], prox[s], behav[s], adv[s], mask[s], units[s], spec, norm=n)[0] for s in (a, b)]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-6)


def test_summarize_rates():
    logp, prox, behav, adv, mask, seq, units = _batch(seed=4)
    spec = LossSpec(loss="ppo", correction="kpop", kpop_phi=0.05)
    _, s = policy_loss(logp, prox, behav, adv, mask, seq, spec)
    m = summarize([s, s])
    keep = mask & kpop_keep(prox, behav, 0.05)
    assert m["mask_rate"] == pytest.approx(1 - keep.sum().item() / mask.sum().item())
    d = (prox - behav).abs()[mask]
    assert m["dlogp_mean"] == pytest.approx(d.mean().item(), rel=1e-5)
    assert m["dlogp_max"] == pytest.approx(d.max().item())
    assert 0.0 <= m["clip_frac"] <= 1.0


def test_bad_input_is_named():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="flat"):
        policy_loss(x, x, x, x, x.bool(), torch.zeros(5, dtype=torch.long), LossSpec())
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(x, x, x, x, x.bool(), x.long(), LossSpec(loss="dpo"))


def test_linguistic_units_split_on_pause_punctuation_and_turns():
    toks = ["Hello", ",", " world", ". ", "Next", " one", "!\n", "tool", " out", "ok", "？", "好"]
    mask = [1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    assert linguistic_units(toks, mask) == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]
    assert linguistic_units(["a", "b"]) == [0, 0]
    with pytest.raises(ValueError, match="loss_mask"):
        linguistic_units(["a"], [1, 0])


@pytest.mark.parametrize("correction, why", [("kpop", 1), ("icepop", 2), ("none", None)])
def test_token_decisions_are_the_mask_the_loss_uses(correction, why):
    from kpop.algo.losses import TokenDecision, token_decisions

    logp, prox, behav, adv, mask, seq, _ = _batch(seed=3)
    spec = LossSpec(correction=correction, kpop_phi=0.05, icepop_alpha=0.7, icepop_beta=1.5)
    d = token_decisions(prox, behav, mask, spec)
    assert d.dtype == torch.int8 and d.shape == mask.shape
    for t in range(len(mask)):
        if not mask[t]:
            assert d[t] == TokenDecision.NOT_TRAINED
        else:
            assert d[t] == (TokenDecision.KEEP if _keep(spec, float(prox[t]), float(behav[t])) else why)
    if why is not None:
        assert 0 < int((d == why).sum()) < int(mask.sum())  # the batch exercises both verdicts
    # the loss with these decisions passed in is the loss it computes itself; a different mask changes it
    own, stats = policy_loss(logp, prox, behav, adv, mask, seq, spec)
    given, _ = policy_loss(logp, prox, behav, adv, mask, seq, spec, decisions=d)
    assert torch.equal(own, given) and int(stats["masked"]) == int(((d != 0) & mask).sum())
    flipped = d.masked_fill(mask, int(TokenDecision.KEEP))
    if why is not None:
        assert not torch.equal(policy_loss(logp, prox, behav, adv, mask, seq, spec, decisions=flipped)[0], own)
