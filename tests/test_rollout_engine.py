"""Sampling and the embedded engine on the tiny policy (fp32, CPU, torch kernels)."""

from __future__ import annotations

import asyncio
import copy
import math
import time

import pytest
import torch

from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config
from kpop.rollout.embedded import EmbeddedEngine
from kpop.rollout.engine import EngineError, GenerationRequest, SamplingParams
from kpop.rollout.sampling import SamplingBatch, race_noise, sample, truncate

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=VOCAB), seed=0).eval()


@pytest.fixture()
def engine(model):
    e = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=256)
    yield e
    e.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def recompute(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Learner side: full forward over prompt+completion, logprob of each completion token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


# -- sampling ------------------------------------------------------------------------------------

def test_truncate_keeps_top_k_and_nucleus():
    lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3), -1)
    out = truncate(lp, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1e-6]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]  # p(top) = 0.64 >= 0.5
    assert torch.isfinite(out[2]).tolist() == [True, False, False, False]  # always keep the best


def batch_of(params, seeds=None, steps=None):
    return SamplingBatch.of(params, seeds or [0] * len(params), steps or [0] * len(params))


def test_sample_matches_distribution_and_reports_processed_logprob():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=2.0)
    counts = torch.zeros(4)
    for step in range(4000):  # each step index draws fresh noise from the same seed
        tok, lp = sample(logits, batch_of([p], [7], [step]))
        counts[tok] += 1
    want = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / 4000, want, atol=0.03)
    assert math.isclose(lp.item(), torch.log(want[tok]).item(), rel_tol=1e-5)


def test_sample_truncated_distribution_and_batch_invariance():
    """top-k / top-p sample from the renormalised nucleus; a row's token depends only on its own
    (seed, step), whatever else is in the batch."""
    logits = torch.tensor([[3.0, 2.0, 1.5, 0.0, -1.0]])
    p = SamplingParams(temperature=1.0, top_k=3, top_p=0.9)
    keep = truncate(torch.log_softmax(logits, -1), torch.tensor([3]), torch.tensor([0.9]))[0]
    want = torch.softmax(keep, -1)
    n = 4000
    toks = sample(logits.expand(n, -1), batch_of([p] * n, [5] * n, list(range(n))))[0]
    assert torch.allclose(torch.bincount(toks, minlength=5).float() / n, want, atol=0.03)
    assert want[3:].sum() == 0 and (toks < 3).all()
    mixed = torch.randn(6, 5)
    mixed[2] = logits[0]
    params = [SamplingParams(temperature=t) for t in (0.0, 0.5, 1.0, 1.5, 0.0, 2.0)]
    params[2] = p
    batched = sample(mixed, batch_of(params, [1, 2, 5, 4, 5, 6], [9, 8, 123, 6, 5, 4]))[0]
    assert batched[2] == sample(logits, batch_of([p], [5], [123]))[0][0]
    assert batched[0] == mixed[0].argmax() and batched[4] == mixed[4].argmax()


def test_race_noise_is_exponential_and_keyed():
    noise = race_noise(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]), 20000)
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1) < 0.02 and abs(noise.var().item() - 1) < 0.05
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], race_noise(torch.tensor([3]), torch.tensor([0]), 20000)[0])
    big = race_noise(torch.tensor([2**62 + 12345]), torch.tensor([2**31 + 7]), 64)  # full-width seeds and steps
    assert torch.isfinite(big).all()


def test_sample_greedy_and_bad_input():
    logits = torch.randn(3, 50)
    tok, lp = sample(logits, batch_of([SamplingParams(temperature=0)] * 3))
    assert tok.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(lp, torch.log_softmax(logits, -1).max(-1).values)
    with pytest.raises(ValueError, match="3 logit rows but settings for 2"):
        sample(logits, batch_of([SamplingParams()] * 2))
    with pytest.raises(ValueError, match="2 params, 1 seeds"):
        SamplingBatch.of([SamplingParams()] * 2, [1], [0, 0])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# -- embedded engine ---------------------------------------------------------------------------

def test_greedy_batch_equals_single_and_logprobs_match_learner(model, engine):
    ps = prompts(6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])
    for p, r in zip(ps, batch):
        single = engine.generate([GenerationRequest(prompt_token_ids=p, params=params)])[0]
        assert r.token_ids == single.token_ids and len(r.token_ids) == 12
        assert r.finish_reason == "length" and r.token_versions == [0] * 12
        delta = (recompute(model, p, r.token_ids) - torch.tensor(r.logprobs)).abs().max().item()
        assert delta < 1e-4, delta


def test_sampled_logprobs_match_learner_at_temperature(model, engine):
    ps = prompts(4, seed=1)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=10, ignore_eos=True, seed=3)
    for p, r in zip(ps, engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])):
        delta = (recompute(model, p, r.token_ids, 0.7) - torch.tensor(r.logprobs)).abs().max().item()
        assert delta < 1e-4, delta


def test_seeded_requests_reproduce_in_any_batch(engine):
    p = prompts(1, seed=2)[0]
    seeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=11)
    alone = engine.generate([GenerationRequest(prompt_token_ids=p, params=seeded)])[0]
    others = [GenerationRequest(prompt_token_ids=q, params=SamplingParams(max_tokens=6, ignore_eos=True))
              for q in prompts(5, seed=3)]
    mixed = engine.generate([*others[:2], GenerationRequest(prompt_token_ids=p, params=seeded), *others[2:]])[2]
    assert alone.token_ids == mixed.token_ids
    other_seed = engine.generate([GenerationRequest(prompt_token_ids=p, params=seeded.model_copy(update={"seed": 12}))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_tokens_and_eos(model, engine):
    p = prompts(1, seed=4)[0]
    free = engine.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))])[0]
    third = free.token_ids[2]
    stop = engine.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=(third,)))])[0]
    first = free.token_ids.index(third)
    assert stop.token_ids == free.token_ids[: first + 1]
    assert stop.finish_reason == "stop" and stop.stop_reason == third
    # the same token as the model's eos ends generation unless ignore_eos
    eos_engine = EmbeddedEngine(model, max_seqs=2)
    assert eos_engine.cache.block_size == 16  # the CPU default page (64 on a GPU: tests/test_policy_gpu.py)
    eos_engine.eos_ids = {third}
    r = eos_engine.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=8))])[0]
    eos_engine.close()
    assert r.token_ids == free.token_ids[: first + 1] and r.finish_reason == "stop"


def test_stop_strings_need_and_use_tokenizer(model, engine):
    from kpop.policy.tokenizer import get_tokenizer

    with pytest.raises(EngineError, match="stop strings need"):
        engine.submit(GenerationRequest(prompt_token_ids=[5, 6], params=SamplingParams(stop=("x",))))
    tok = get_tokenizer()
    big = build_model(tiny_config(vocab_size=len(tok)), seed=0)
    e = EmbeddedEngine(big, tok, max_seqs=2)
    p = tok("def main():", add_special_tokens=False)["input_ids"]
    free = e.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])[0]
    text = tok.decode(free.token_ids[:4], skip_special_tokens=False)
    needle = text[-2:] if text.strip() else None
    if needle:
        r = e.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, stop=(needle,)))])[0]
        assert r.finish_reason == "stop" and r.stop_reason == needle
        assert len(r.token_ids) <= 4 and needle not in r.text
    e.close()


def test_bad_requests_are_named(engine):
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit(GenerationRequest(prompt_token_ids=[1, VOCAB + 5]))
    with pytest.raises(EngineError, match="max_model_len"):
        engine.submit(GenerationRequest(prompt_token_ids=[3] * (engine.max_model_len + 1)))
    with pytest.raises(KeyError, match="unknown tensor names"):
        engine.update_weights({"model.nope.weight": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="mis-shaped"):
        engine.update_weights({"lm_head.weight": torch.zeros(1)}, 1)
    engine.update_weights({}, 3)
    with pytest.raises(ValueError, match="backwards"):
        engine.update_weights({}, 2)


def test_abort_pause_resume(engine):
    async def run():
        long = GenerationRequest(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=3000, ignore_eos=True))
        task = asyncio.ensure_future(engine.agenerate(long))
        await asyncio.sleep(0.3)
        engine.abort(long.request_id)
        r = await task
        assert r.finish_reason == "abort" and 0 < len(r.token_ids) < 3000

        engine.pause()  # a paused engine admits requests but does not step
        steps = engine.stats["steps"]
        req = GenerationRequest(prompt_token_ids=[9, 10, 11], params=SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        task = asyncio.ensure_future(engine.agenerate(req))
        await asyncio.sleep(0.3)
        assert not task.done() and engine.stats["steps"] == steps
        engine.resume()
        r = await asyncio.wait_for(task, 30)
        assert r.finish_reason == "length" and len(r.token_ids) == 5

    asyncio.run(run())


def test_update_weights_versions_and_reprefill(model):
    """A request spanning an update re-prefills: tokens after the update score exactly under the
    new weights, and each token keeps the version that sampled it."""
    new_model = copy.deepcopy(model)
    with torch.no_grad():
        for w in new_model.parameters():
            w.add_(0.02 * torch.randn_like(w))
    engine = EmbeddedEngine(copy.deepcopy(model), max_seqs=4)
    p = prompts(1, seed=5)[0]
    fut = engine.submit(GenerationRequest(prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=400, ignore_eos=True)))
    deadline = time.time() + 30
    while engine.stats["decode_tokens"] < 5 and time.time() < deadline:
        time.sleep(0.01)
    try:
        engine.update_weights(new_model.state_dict(), 1)
        r = fut.result(timeout=120)
        k = r.token_versions.index(1)
        assert 0 < k and set(r.token_versions[:k]) == {0} and set(r.token_versions[k:]) == {1}
        assert engine.stats["reprefills"] == 1
        lp = torch.tensor(r.logprobs)
        assert (recompute(model, p, r.token_ids[:k]) - lp[:k]).abs().max() < 1e-4
        assert (recompute(new_model, p + r.token_ids[:k], r.token_ids[k:]) - lp[k:]).abs().max() < 1e-4
        fresh = engine.generate([GenerationRequest(prompt_token_ids=p, params=SamplingParams(
            temperature=0, max_tokens=4, ignore_eos=True))])[0]
        assert fresh.token_versions == [1] * 4
        assert (recompute(new_model, p, fresh.token_ids) - torch.tensor(fresh.logprobs)).abs().max() < 1e-4
    finally:
        engine.close()


def test_preemption_when_cache_is_full(model):
    """With room for few tokens, requests are preempted and re-prefilled; greedy output is unchanged."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in prompts(4, seed=6)]
    roomy = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=256)
    tight = EmbeddedEngine(model, max_seqs=4, block_size=4, num_blocks=14)
    try:
        want = roomy.generate(reqs)
        got = tight.generate([r.model_copy(update={"request_id": r.request_id + "-t"}) for r in reqs])
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert tight.stats["preemptions"] > 0
        delta = max((torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item() for a, b in zip(got, want))
        assert delta < 1e-4
    finally:
        roomy.close()
        tight.close()


def test_consistency_metric():
    from logprob_check import logprob_consistency

    train = torch.log(torch.tensor([0.5, 0.9, 0.2, 0.7]))
    rollout = torch.log(torch.tensor([0.5, 0.1, 0.2, 0.7]))
    m = logprob_consistency(train, rollout, torch.tensor([1, 1, 1, 0]), phi=0.5)
    assert m["tokens"] == 3 and m["kpop_mask_rate"] == pytest.approx(1 / 3)
    assert m["logprob_delta_max"] == pytest.approx(math.log(9), rel=1e-5)
    assert m["logprob_delta_mean"] == pytest.approx(math.log(9) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_consistency(train, rollout[:2], torch.ones(4))
