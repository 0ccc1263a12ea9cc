"""The learner's per-token mismatch record (CPU, tiny preset, real embedded-engine rollouts): its own
logprobs, the loss's decisions, and per MoE layer whether its router would flip the recorded route."""

from __future__ import annotations

import copy

import pytest
import torch

from kpop.algo.losses import TokenDecision, icepop_keep, kpop_keep
from kpop.config import AlgorithmConfig, LearnerConfig
from kpop.trajectory import Routes
from learner.learner import Learner
from test_routing_replay import full_routes, model, perturb_router, rollouts, trajectory  # noqa: F401


def learner(model, stage: int = 0, **algo) -> Learner:
    lcfg = LearnerConfig(lr=1e-3, zero_stage=stage, micro_batch_tokens=64, expert_bias_update_rate=0.0)
    return Learner(lcfg, AlgorithmConfig(**algo), copy.deepcopy(model))


def batch(model, **kw):
    return [trajectory(r, group_id="g", reward=float(i), **kw) for i, r in enumerate(rollouts(model))]


def bits(mask: int, layers: int) -> list[int]:
    return [(mask >> l) & 1 for l in range(layers)]


def expected_flips(lrn_model, traj) -> torch.Tensor:
    """[T, layers] bool from the learner model's own full forward (no replay): its router's sets vs
    the recorded ones, on tokens with a recorded route."""
    own = full_routes(lrn_model, traj.token_ids).sort(-1).values
    rec = traj.routes.ids()
    return (own != rec.sort(-1).values).any(-1) & (rec[..., 0] >= 0)


def test_same_router_no_flip_and_the_record_covers_every_trajectory(model):
    trajs = batch(model)
    failed = trajs[0].model_copy(update={"status": "failed", "error": "env fault", "trajectory_id": "f"})
    lrn = learner(model, routing_replay=True)
    m = lrn.train_step([failed, *trajs])
    assert m["route_flip_rate"] == 0.0 and m["route_flip_rate_lightning"] == 0.0 and m["route_flip_rate_mla"] == 0.0
    rec = lrn.last_tokens
    assert len(rec) == 3 and rec[0].train_logprobs is None and rec[0].route_flips is None
    assert rec[0].decisions == [TokenDecision.NOT_TRAINED] * failed.num_tokens
    for r, t in zip(rec[1:], trajs):
        assert len(r.train_logprobs) == len(r.decisions) == len(r.route_flips) == t.num_tokens
        assert r.route_flips == [0] * t.num_tokens


@pytest.mark.parametrize("replay", [False, True])
def test_a_forced_route_flip_shows_in_the_record_and_the_metric(model, replay):
    """One recorded route edited at (token t, last MoE layer): that bit, and only it, is a flip;
    the rate of that layer's attention kind counts exactly one pair. The last layer, so that with
    replay on the forced experts cannot move any router's input."""
    trajs = batch(model)
    moe = model.moe_layers()
    L, k, E = len(moe), model.config.num_experts_per_tok, model.config.num_experts
    ids = trajs[0].routes.ids().clone()
    t = 7
    ids[t, L - 1] = torch.tensor([e for e in range(E) if e not in ids[t, L - 1].tolist()][:k])
    known = ids[:, 0, 0] >= 0
    trajs[0] = trajs[0].model_copy(update={"routes": Routes.from_ids(ids.clamp(min=0), E, known=known)})
    lrn = learner(model, routing_replay=replay)
    m = lrn.train_step(trajs)
    flips = lrn.last_tokens[0].route_flips
    assert flips[t] == 1 << (L - 1) and sum(1 for f in flips if f) == 1
    assert lrn.last_tokens[1].route_flips == [0] * trajs[1].num_tokens
    pairs = sum(int((tr.routes.ids()[:, 0, 0] >= 0).sum()) for tr in trajs)  # tokens with a route
    kinds = model.config.mixer_types()
    last_kind = "mla" if kinds[moe[-1]] == "attention" else "lightning"
    n_kind = sum((kinds[i] == "attention") == (last_kind == "mla") for i in moe)
    assert m["route_flip_rate"] == pytest.approx(1 / (pairs * L))
    assert m[f"route_flip_rate_{last_kind}"] == pytest.approx(1 / (pairs * n_kind))
    assert m["route_flip_rate_" + ("lightning" if last_kind == "mla" else "mla")] == 0.0


def test_a_perturbed_router_flips_what_its_own_forward_chooses(model):
    """Replay off: the record is exactly the learner's full forward vs the recording. Replay on: the
    learner's own choice is still measured (not the replayed experts); at the first MoE layer, whose
    input no routing can change, it is the same as without replay."""
    trajs = batch(model)
    L = len(model.moe_layers())
    off = learner(model, routing_replay=False)
    perturb_router(off.engine.module)
    want = [expected_flips(off.engine.module, t) for t in trajs]  # before the step moves the weights
    m_off = off.train_step(trajs)
    got = [torch.tensor([bits(f, L) for f in r.route_flips], dtype=torch.bool) for r in off.last_tokens]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    n_flips = sum(int(w.sum()) for w in want)
    n_pairs = sum(int((t.routes.ids()[:, 0, 0] >= 0).sum()) * L for t in trajs)
    assert n_flips > 0 and m_off["route_flip_rate"] == pytest.approx(n_flips / n_pairs)

    on = learner(model, routing_replay=True)
    perturb_router(on.engine.module)
    m_on = on.train_step(trajs)
    got_on = [torch.tensor([bits(f, L) for f in r.route_flips], dtype=torch.bool) for r in on.last_tokens]
    assert m_on["route_flip_rate"] > 0
    assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(got_on, got))


def test_decisions_are_the_mask_the_loss_used(model):
    trajs = batch(model)
    phi = 1e-7  # the random tiny policy gives every token p ~ 1/vocab: its binary KLs are tiny
    lrn = learner(model, routing_replay=False, correction="kpop", kpop_phi=phi)
    perturb_router(lrn.engine.module)  # a mismatch for KPop to find
    before = lrn.logprobs([t.token_ids for t in trajs])
    m = lrn.train_step(trajs)
    masked = loss_tokens = 0
    for t, r, lp in zip(trajs, lrn.last_tokens, before):
        train = torch.tensor(r.train_logprobs)
        torch.testing.assert_close(train[1:], lp, atol=1e-5, rtol=0)  # the step's own logprobs, pre-update
        assert r.train_logprobs[0] == 0.0
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        keep = kpop_keep(train, torch.tensor(t.logprobs), phi)
        want = torch.where(mask, torch.where(keep, 0, int(TokenDecision.MASK_KL)), int(TokenDecision.NOT_TRAINED))
        assert r.decisions == want.tolist()
        masked += int((mask & ~keep).sum())
        loss_tokens += int(mask.sum())
    assert 0 < masked < loss_tokens
    assert m["mask_rate"] == pytest.approx(masked / loss_tokens)


def test_icepop_decisions_and_no_routes(model):
    trajs = [t.model_copy(update={"routes": None}) for t in batch(model)]
    lrn = learner(model, routing_replay=False, correction="icepop", icepop_alpha=0.999, icepop_beta=1.001)
    perturb_router(lrn.engine.module)
    m = lrn.train_step(trajs)
    assert "route_flip_rate" not in m  # nothing recorded, nothing to compare against
    assert all(r.route_flips is None for r in lrn.last_tokens)
    masked = 0
    for r, t in zip(lrn.last_tokens, trajs):  # each decision is the IcePop window's verdict on that token
        keep = icepop_keep(torch.tensor(r.train_logprobs, dtype=torch.float64),
                           torch.tensor(t.logprobs, dtype=torch.float64), 0.999, 1.001)
        want = [(TokenDecision.KEEP if k else TokenDecision.MASK_RATIO) if m else TokenDecision.NOT_TRAINED
                for k, m in zip(keep.tolist(), t.loss_mask)]
        assert r.decisions == want
        masked += want.count(TokenDecision.MASK_RATIO)
    assert masked > 0  # the perturbed router moves the learner's probabilities out of a 0.1% window


def test_zero3_measures_the_same_flips(model):
    """Under ZeRO-3 the flips are those of a plain learner. (The tiny gates stay whole: they are below
    DeepSpeed's parameter-persistence threshold, so this does not reach the release of a big gate's
    weight after its forward, which the hooks' order handles. `perturb_router` moves `expert_bias`, a
    buffer: never partitioned.)"""
    trajs = batch(model)
    learners = [learner(model, stage=stage, routing_replay=True) for stage in (0, 3)]
    for lrn in learners:
        perturb_router(lrn.engine.module)
    m0, m3 = (lrn.train_step(trajs) for lrn in learners)
    assert m0["route_flip_rate"] > 0 and m3["route_flip_rate"] == pytest.approx(m0["route_flip_rate"])
    assert [r.route_flips for r in learners[0].last_tokens] == [r.route_flips for r in learners[1].last_tokens]
