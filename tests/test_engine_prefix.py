"""Shared-prefix groups in the embedded engine (CPU, fp32): requests with one prompt prefill it
once and fork the cache; the results equal prefilling each request on its own."""

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


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engines(model, **kw):
    shared = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=256, **kw)
    plain = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=256, share_prefix=False, **kw)
    return shared, plain


def together(engine, reqs):
    """Submit while paused, so every request is admitted in the same step (the group arrives before
    its leader's prefill is done, which is when sharing applies)."""
    engine.pause()
    futures = [engine.submit(r) for r in reqs]
    engine.resume()
    return [f.result() for f in futures]


def assert_same(a, b):
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert torch.equal(a.routes.ids(), b.routes.ids())


def test_shared_prefix_equals_unshared_greedy(model):
    group = prompt(23, 0)
    reqs = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
            for p in [group] * 4 + [prompt(11, 1), prompt(17, 2)]]
    shared, plain = engines(model)
    try:
        a, b = together(shared, reqs), together(plain, reqs)
    finally:
        shared.close()
        plain.close()
    for x, y in zip(a, b):
        assert_same(x, y)
    assert shared.stats["forks"] == 3 and shared.stats["prefill_tokens_saved"] == 3 * 23
    assert shared.stats["prefill_tokens"] == plain.stats["prefill_tokens"] - 3 * 23
    assert plain.stats["forks"] == 0


def test_shared_prefix_samples_each_request_with_its_own_seed(model):
    group = prompt(19, 3)
    reqs = [GenerationRequest(prompt_token_ids=group,
                              params=SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=s))
            for s in range(4)]
    shared, plain = engines(model)
    try:
        a = together(shared, reqs)
        alone = [plain.generate([r])[0] for r in reqs]
    finally:
        shared.close()
        plain.close()
    for x, y in zip(a, alone):
        assert_same(x, y)
    assert len({tuple(x.token_ids) for x in a}) > 1  # four seeds, not four copies
    assert shared.stats["forks"] == 3


def test_followers_prefill_alone_when_the_leader_goes_first(model):
    """The leader is aborted while its (chunked) prefill is under way: its followers lose nothing,
    they prefill on their own and give what an unshared engine gives."""
    group = prompt(30, 4)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=group, params=params, request_id=f"r{i}") for i in range(3)]
    shared = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=256, max_batch_tokens=8)
    plain = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=256, share_prefix=False)
    futures = [concurrent.futures.Future() for _ in reqs]
    for r, f in zip(reqs, futures):
        shared._add(r, f)  # stepped by hand on this thread: the abort lands mid-prefill
    shared._step()
    assert shared._running[0].followers and 0 < shared._running[0].cached < 30
    shared._abort("r0")
    while shared._has_work():
        shared._step()
    try:
        want = plain.generate([reqs[1]])[0]
    finally:
        plain.close()
    assert futures[0].result().finish_reason == "abort"
    for f in futures[1:]:
        assert_same(f.result(), want)
    # the first follower became the leader of the second once the old leader was gone
    assert shared.stats["forks"] == 1 and shared.stats["prefill_tokens_saved"] == 30
