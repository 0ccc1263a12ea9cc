"""MoE routing replay (R3) on CPU with the tiny preset: the embedded engine records each token's
experts, they travel in the `Trajectory`, and the learner's forward replays them."""

from __future__ import annotations

import concurrent.futures
import copy

import msgpack
import pytest
import torch

from kpop.config import AlgorithmConfig, LearnerConfig
from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config
from kpop.rollout.chat import TokenTrace
from kpop.rollout.embedded import EmbeddedEngine
from kpop.rollout.engine import GenerationRequest, SamplingParams
from kpop.stream import TrajectoryStream
from kpop.trajectory import Routes, Trajectory, TrajectoryDecodeError, decode, encode
from learner.learner import Learner

VOCAB = 256
PROMPTS = [[5, 17, 99, 3, 42, 7], [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=VOCAB), seed=0).eval()


def rollouts(model, prompts=PROMPTS, max_tokens: int = 10) -> list:
    engine = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=128)
    try:
        reqs = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=max_tokens, seed=i,
                                                                             ignore_eos=True))
                for i, p in enumerate(prompts)]
        return engine.generate(reqs)
    finally:
        engine.close()


def full_routes(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), return_expert_ids=True).expert_ids


def trajectory(result, **kw) -> Trajectory:
    ids = result.prompt_token_ids + result.token_ids
    n = len(result.prompt_token_ids)
    return Trajectory(run_id="r", task_id="t", env_id="e", token_ids=ids, logprobs=[0.0] * n + result.logprobs,
                      loss_mask=[0] * n + [1] * len(result.token_ids), segments=[(n, len(ids), 0)],
                      **{"routes": result.routes, **kw})


def learner(model, replay: bool | None) -> Learner:
    lcfg = LearnerConfig(lr=1e-3, zero_stage=0, micro_batch_tokens=256)
    return Learner(lcfg, AlgorithmConfig(routing_replay=replay), copy.deepcopy(model))


def perturb_router(model, seed: int = 1) -> None:
    """Move every router's `expert_bias` (which chooses experts but never weights them), so the
    learner's router picks other experts than the engine's for many tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.expert_bias.add_(torch.rand(gate.expert_bias.shape, generator=g) * 0.5)


# -- (a) the engine records routes --------------------------------------------------------------

def test_engine_records_the_routes_a_full_forward_chooses(model):
    moe, k = len(model.moe_layers()), model.config.num_experts_per_tok
    assert moe >= 2
    for r in rollouts(model):
        ids = r.prompt_token_ids + r.token_ids
        assert r.routes.shape == (len(ids), moe, k) and r.routes.dtype == "uint8"
        got = r.routes.ids()
        # every token the model processed has a route; the last sampled one was never fed back
        assert (got[:-1] >= 0).all() and (got[-1] == -1).all()
        want = full_routes(model, ids)[:-1]
        # top-k order may differ between the batched prefill/decode and the full forward: compare sets
        assert torch.equal(got[:-1].sort(-1).values, want.sort(-1).values)


def test_routes_after_a_mid_request_weight_update_are_the_last_pass(model):
    """A weight update mid-request re-prefills: the routes are those of the new weights' pass."""
    new = copy.deepcopy(model)
    perturb_router(new, seed=3)
    engine = EmbeddedEngine(model=copy.deepcopy(model), max_seqs=2, block_size=4, num_blocks=64)
    try:
        req = GenerationRequest(prompt_token_ids=PROMPTS[0], params=SamplingParams(max_tokens=12, seed=0, ignore_eos=True))
        fut = concurrent.futures.Future()
        # the scheduler's own hooks, stepped here instead of on its thread: the update lands after
        # exactly 5 steps (prefill + 4 decodes), not wherever a timer would put it
        engine._add(req, fut)
        for _ in range(5):
            engine._step()
        engine.update_weights(new.state_dict(), 1)
        while not fut.done():
            engine._step()
        r = fut.result()
    finally:
        engine.close()
    assert r.token_versions == [0] * 5 + [1] * 7
    ids = r.prompt_token_ids + r.token_ids
    k = r.token_versions.index(1) + len(r.prompt_token_ids)  # first token sampled under the new weights
    got, old_full, new_full = r.routes.ids()[:-1], full_routes(model, ids)[:-1], full_routes(new, ids)[:-1]
    # the re-prefill ran every token before k under the new weights; later tokens were fed under them too
    assert torch.equal(got.sort(-1).values, new_full.sort(-1).values)
    assert not torch.equal(got[:k].sort(-1).values, old_full[:k].sort(-1).values)  # the perturbation mattered


def test_chat_trace_routes_cover_the_episode():
    routes = Routes.from_ids(torch.arange(12).view(4, 1, 3) % 8, num_experts=8)
    trace = TokenTrace()
    trace.extend([1, 2])
    trace.extend([3, 4], [-0.1, -0.2], [0, 0])
    trace.set_routes(routes)
    trace.extend([9])  # a tool result after the last turn: no route
    out = trace.episode_routes()
    assert out.shape == (5, 1, 3)
    assert out.ids()[:4].tolist() == routes.ids().tolist() and (out.ids()[4] == -1).all()


# -- (b) the learner replays them ---------------------------------------------------------------

def _dlogp(lrn: Learner, trajs: list[Trajectory], replay: bool) -> torch.Tensor:
    lps = lrn.logprobs([t.token_ids for t in trajs], routes=[t.routes for t in trajs] if replay else None)
    diffs = []
    for t, lp in zip(trajs, lps):
        n = t.loss_mask.index(1)
        diffs.append(lp[n - 1 :] - torch.tensor(t.logprobs[n:]))
    return torch.cat(diffs).abs()


def test_replay_matches_the_engine_even_when_the_router_flips(model):
    trajs = [trajectory(r) for r in rollouts(model)]
    # same weights: with or without replay, the learner reproduces the engine's logprobs
    lrn = learner(model, replay=True)
    assert _dlogp(lrn, trajs, replay=True).max() < 1e-4
    # the learner's router now picks other experts: without replay the logprobs move, with it they don't
    perturb_router(lrn.engine.module)
    flipped = full_routes(lrn.engine.module, trajs[0].token_ids)[:-1].sort(-1).values
    assert not torch.equal(flipped, trajs[0].routes.ids()[:-1].sort(-1).values)
    with_replay, without = _dlogp(lrn, trajs, replay=True), _dlogp(lrn, trajs, replay=False)
    assert with_replay.max() < 1e-4, with_replay.max()
    assert without.mean() > 1e-3 and without.max() > 1e-2, (without.mean(), without.max())


def test_replay_off_and_missing_routes_fall_back_to_the_router(model):
    trajs = [trajectory(r) for r in rollouts(model)]
    off = learner(model, replay=False)
    assert not off.routing_replay
    perturb_router(off.engine.module)
    assert _dlogp(off, trajs, replay=True).mean() > 1e-3  # routes given, replay off: not used
    on = learner(model, replay=None)  # None = on for an MoE policy
    assert on.routing_replay
    perturb_router(on.engine.module)
    # one sequence with routes, one without (an old record): each gets its own treatment
    mixed = [trajs[0], trajs[1].model_copy(update={"routes": None})]
    lps = on.logprobs([t.token_ids for t in mixed], routes=[t.routes for t in mixed])
    alone = on.logprobs([mixed[1].token_ids])
    torch.testing.assert_close(lps[1], alone[0], atol=1e-5, rtol=0)
    assert _dlogp(on, mixed[:1], replay=True).max() < 1e-4


def test_train_step_replays_and_the_router_still_learns(model):
    trajs = [trajectory(r, group_id="g", reward=float(i)) for i, r in enumerate(rollouts(model))]
    trajs.append(trajs[1].model_copy(update={"routes": None, "reward": 0.5}))
    lrn = learner(model, replay=True)
    gate = lrn.engine.module.model.layers[model.moe_layers()[0]].mlp.gate
    before = gate.weight.detach().clone()
    out = lrn.train_step(trajs)
    assert out["skipped"] == 0.0
    n_routed = sum(t.num_tokens - 1 for t in trajs[:-1])  # the last sampled token of each has no route
    assert out["routing_replay_share"] == pytest.approx(n_routed / sum(t.num_tokens for t in trajs))
    assert not torch.equal(before, gate.weight.detach())  # the router's scores weight the replayed experts


def test_hostile_routes_are_refused_by_the_learner(model):
    r = rollouts(model, PROMPTS[:1])[0]
    lrn = learner(model, replay=True)
    n = len(r.prompt_token_ids) + len(r.token_ids)
    moe, k = len(model.moe_layers()), model.config.num_experts_per_tok
    wrong_layers = Routes.from_ids(torch.zeros(n, moe + 1, k, dtype=torch.long), 256)
    batch = [trajectory(r, group_id="g", reward=0.0), trajectory(r, group_id="g", reward=1.0, routes=None)]
    batch[0] = batch[0].model_copy(update={"routes": wrong_layers})
    with pytest.raises(ValueError, match=f"trajectory {batch[0].trajectory_id}: routes .* do not fit this policy"):
        lrn.train_step(batch)
    too_big = Routes.from_ids(torch.full((n, moe, k), 200), 256)  # uint8 allows it, the policy has fewer experts
    with pytest.raises(ValueError, match="sequence 0: routes name expert 200"):
        lrn.logprobs([r.prompt_token_ids + r.token_ids], routes=[too_big])


# -- (c) schema and hostile records ----------------------------------------------------------

def _doc(traj: Trajectory) -> dict:
    return msgpack.unpackb(encode(traj), raw=False)


def test_v3_records_migrate_without_routes():
    t = Trajectory(run_id="r", task_id="t", env_id="e", token_ids=[1, 2], logprobs=[0.0, -1.0], loss_mask=[0, 1])
    doc = _doc(t)
    assert doc["_v"] == 4 and "routes" not in doc
    doc["_v"] = 3
    assert decode(msgpack.packb(doc, use_bin_type=True)) == t
    doc["routes"] = "a v3 writer never wrote this"
    assert decode(msgpack.packb(doc, use_bin_type=True)).routes is None


def _with_routes() -> Trajectory:
    routes = Routes.from_ids(torch.tensor([[[1, 2]], [[3, 4]], [[0, 0]]]), 8, torch.tensor([True, True, False]))
    return Trajectory(run_id="r", task_id="t", env_id="e", token_ids=[1, 2, 3], logprobs=[0.0, -1.0, -2.0],
                      loss_mask=[0, 1, 1], segments=[(1, 3, 0)], routes=routes)


HOSTILE = {
    "short data": ({"data": b"\x01\x02"}, "routes data has 2 bytes"),
    "wrong dtype": ({"dtype": "int64"}, "dtype"),
    "shape vs tokens": ({"shape": [2, 1, 2], "data": b"\x01\x02\x03\x04", "known": b"\x01\x01"}, "routes cover 2 tokens"),
    "known not 0/1": ({"known": b"\x01\x07\x00"}, "known must be"),
    "negative shape": ({"shape": [3, -1, 2]}, "shape"),
    "not a map": ("routes", "routes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_routes_in_a_record_are_a_clear_decode_error(case):
    change, message = HOSTILE[case]
    doc = _doc(_with_routes())
    doc["routes"] = {**doc["routes"], **change} if isinstance(change, dict) else change
    with pytest.raises(TrajectoryDecodeError, match=message):
        decode(msgpack.packb(doc, use_bin_type=True))


# -- (d) the stream ----------------------------------------------------------------------------

def test_stream_round_trips_routes_and_dead_letters_hostile_ones(redis_url):
    prod = TrajectoryStream(redis_url, consumer="p", block_ms=50, claim_idle_ms=0)
    cons = TrajectoryStream(redis_url, consumer="c", block_ms=50, claim_idle_ms=0)
    good = _with_routes()
    prod.put(good)
    doc = _doc(_with_routes())
    doc["routes"]["data"] = b"\x01"
    from kpop.redis_server import connect

    connect(redis_url).xadd(prod.key, {"id": "hostile-routes", "d": msgpack.packb(doc, use_bin_type=True)})
    got = cons.get(10)
    assert [t for _, t in got] == [good] and got[0][1].routes.ids().tolist() == good.routes.ids().tolist()
    dead = cons.dead_letters()
    assert len(dead) == 1 and b"routes data has 1 bytes" in dead[0]["error"]


# -- the worker: routes travel from the engine into the episode's Trajectory --------------------

def test_worker_episodes_carry_routes_for_their_tokens():
    import asyncio

    from kpop.config import PolicyConfig, RolloutConfig
    from kpop.rollout.worker import RolloutTask, RolloutWorker

    cfg = RolloutConfig(max_new_tokens=8, max_turns=2, max_concurrent_episodes=2, max_episode_tokens=1024)
    worker = RolloutWorker(PolicyConfig(), cfg, None, run_id="r3")
    tasks = [RolloutTask(env_id="kpop/tooluse-v0", seed=s, group_id="g", env_kwargs={"difficulty": 0}) for s in range(2)]
    try:
        trajs = asyncio.run(worker.play(tasks))
        model = worker.engine.model
    finally:
        worker.close()
    moe, k = len(model.moe_layers()), model.config.num_experts_per_tok
    for t in trajs:
        assert t.num_model_tokens > 0 and t.routes is not None and t.routes.shape == (t.num_tokens, moe, k)
        got = t.routes.ids()
        known = (got[:, 0, 0] >= 0)
        last_model = max(i for i, m in enumerate(t.loss_mask) if m)
        # every token before the last sampled one went through the engine in some turn's pass
        assert known[:last_model].all() and not known[last_model:].any()
        want = full_routes(model, t.token_ids)
        assert torch.equal(got[known].sort(-1).values, want[known].sort(-1).values)
        assert decode(encode(t)) == t


# -- the model's plumbing ----------------------------------------------------------------------

def test_model_replays_its_own_routes_exactly_and_refuses_bad_ones(model):
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        out = model(ids, return_expert_ids=True)
        assert out.expert_ids.shape == (ids.numel(), len(model.moe_layers()), model.config.num_experts_per_tok)
        assert torch.equal(model(ids, expert_ids=out.expert_ids).logits, out.logits)
        none = torch.full_like(out.expert_ids, -1)  # no routes at all: the router decides, bit for bit
        assert torch.equal(model(ids, expert_ids=none).logits, out.logits)
        with pytest.raises(ValueError, match="expert_ids must be"):
            model(ids, expert_ids=out.expert_ids[:, :1])
        half = out.expert_ids.clone()
        half[0, 0, 0] = -1  # a row half forced is neither a route nor "no route"
        with pytest.raises(ValueError, match="all -1"):
            model(ids, expert_ids=half)


def test_replay_under_activation_checkpointing_matches_the_plain_step(model):
    trajs = [trajectory(r, group_id="g", reward=float(i)) for i, r in enumerate(rollouts(model))]
    steps = []
    for ckpt in (False, True):
        lcfg = LearnerConfig(lr=1e-3, zero_stage=0, micro_batch_tokens=256, activation_checkpointing=ckpt)
        lrn = Learner(lcfg, AlgorithmConfig(routing_replay=True), copy.deepcopy(model))
        perturb_router(lrn.engine.module)
        lrn.train_step(trajs)
        steps.append(lrn.engine.module.state_dict())
    for name, w in steps[0].items():
        torch.testing.assert_close(steps[1][name], w, atol=1e-6, rtol=0, msg=name)
