"""The embedded engine's overlap: a decode step is launched before the previous one is read back,
feeding it the previous step's tokens from the device (tiny policy, fp32, CPU: the same code path
as on a GPU, where the read-back runs while the GPU computes)."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config
from kpop.rollout.embedded import EmbeddedEngine
from kpop.rollout.engine import GenerationRequest, SamplingParams

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=VOCAB), seed=0).eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(model, reqs: list[GenerationRequest], overlap: bool, **kw):
    engine = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=256, overlap=overlap, **kw)
    try:
        return engine.generate(reqs), dict(engine.stats)
    finally:
        engine.close()


def assert_same(a, b):
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason
    assert a.token_versions == b.token_versions
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert (a.routes is None) == (b.routes is None)
    if a.routes is not None:
        assert torch.equal(a.routes.ids(), b.routes.ids())


def test_overlap_gives_what_stepping_in_turn_gives(model):
    """Six requests through four slots with mixed lengths, greedy and seeded sampling: chains
    break for admissions and resume; tokens, logprobs, routes and versions are unchanged."""
    reqs = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(
        temperature=0 if i % 2 else 0.9, top_k=0 if i % 3 else 20, seed=i, max_tokens=5 + 7 * i, ignore_eos=True))
        for i, p in enumerate(prompts(6, seed=1))]
    got, stats = run(model, reqs, overlap=True)
    want, _ = run(model, [r.model_copy(update={"request_id": r.request_id + "-w"}) for r in reqs], overlap=False)
    for a, b in zip(got, want):
        assert_same(a, b)
    assert [len(r.token_ids) for r in got] == [5 + 7 * i for i in range(6)]
    assert stats["chained_steps"] > 20
    assert stats.get("discarded_rows", 0) == 0  # lengths are known ahead: no row is computed for nothing


def test_a_stop_inside_a_chain_drops_the_row_in_flight(model):
    """A request that stops on a token id mid-chain: the row launched for it before the stop was
    read is dropped, and every request gets what the engine without overlap gives."""
    base = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            for p in prompts(3, seed=2)]
    plain, _ = run(model, base, overlap=False)
    stop = plain[0].token_ids[9]  # a token the first request greedily samples mid-way
    reqs = [r.model_copy(update={"params": r.params.model_copy(update={"stop_token_ids": (stop,)})}) for r in base]
    got, stats = run(model, reqs, overlap=True)
    want, _ = run(model, [r.model_copy(update={"request_id": r.request_id + "-w"}) for r in reqs], overlap=False)
    assert got[0].finish_reason == "stop" and got[0].token_ids[-1] == stop and len(got[0].token_ids) <= 10
    for a, b in zip(got, want):
        assert_same(a, b)
    assert stats["chained_steps"] > 10 and stats["discarded_rows"] >= 1


def test_a_weight_update_reads_the_step_in_flight_back_first(model):
    """Stepped by hand: with a decode step in flight, a weight update lands it first, so its
    tokens carry the old version; the request then re-prefills under the new weights."""
    engine = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=256)
    fut = concurrent.futures.Future()
    req = GenerationRequest(prompt_token_ids=prompts(1, seed=3)[0],
                            params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine._add(req, fut)
    while engine._inflight is None or engine.stats["decode_tokens"] < 4:
        engine._step()
    seq = engine._running[0]
    in_flight = len(seq.tokens) + 1  # the tokens read back and the one in flight
    engine.update_weights(model.state_dict(), 1)  # same weights, new version: only the bookkeeping changes
    assert len(seq.tokens) == in_flight and set(seq.versions) == {0}  # the row in flight was read back as v0
    while engine._has_work():
        engine._step()
    r = fut.result(timeout=0)
    engine.close()
    assert r.token_versions == [0] * in_flight + [1] * (12 - in_flight)
    assert engine.stats["reprefills"] == 1


def test_a_request_waiting_for_blocks_does_not_stop_the_chain(model):
    """A request that waits for cache blocks (a free slot, but not the headroom to admit it) leaves
    the running sequences' decode steps chained; once blocks free up it is admitted and served as
    without overlap."""
    short = [GenerationRequest(prompt_token_ids=p[:8], params=SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
             for p in prompts(3, seed=4)]
    long = GenerationRequest(prompt_token_ids=(prompts(1, seed=5)[0] * 8)[:72],
                             params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=40)
    futures = [concurrent.futures.Future() for _ in range(4)]
    for r, f in zip(short, futures):
        engine._add(r, f)
    while engine.stats["decode_tokens"] < 3 * 20:
        engine._step()
    engine._add(long, futures[3])  # 18 blocks + 3 of headroom: more than the cache has free now
    assert not engine._admissible()
    chained = engine.stats["chained_steps"]
    while engine._waiting:
        engine._step()
    assert engine.stats["chained_steps"] - chained >= 5
    while engine._has_work():
        engine._step()
    engine.close()
    want, _ = run(model, [r.model_copy(update={"request_id": r.request_id + "-w"}) for r in [*short, long]],
                  overlap=False, **{})
    for f, w in zip(futures, want):
        assert_same(f.result(timeout=0), w)
