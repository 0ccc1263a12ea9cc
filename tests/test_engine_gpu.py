"""The embedded engine on CUDA: CUDA-graph decode, GPU sampling, no host sync inside a step.
Skipped without a GPU. Shapes use the real MLA/Lightning head sizes (576/512 latent, head_dim 128)."""

from __future__ import annotations

import concurrent.futures
import copy

import pytest
import torch

from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config
from kpop.rollout.embedded import EmbeddedEngine
from kpop.rollout.engine import GenerationRequest, SamplingParams
from kpop.rollout.sampling import SamplingBatch, race_noise, sample

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 256
REAL_HEADS = dict(hidden_size=256, num_attention_heads=4, head_dim=128, group_norm_size=4, q_lora_rank=128,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  intermediate_size=512, moe_intermediate_size=128)


@pytest.fixture(scope="module")
def model():
    # every expert routed: top-k routing is discontinuous, and bf16 rounding differences between two
    # equally valid paths can flip a near-tie expert; these tests are about the engine, not routing
    return build_model(tiny_config(VOCAB, **REAL_HEADS, num_experts_per_tok=8, topk_group=4), seed=0,
                       device="cuda", dtype="bfloat16").eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(5, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def full_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(-1).cpu()


def test_graph_decode_equals_eager_decode_greedy(model):
    ps = prompts(5)  # batch 5: padded to the bucket of 8
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in ps]
    graphed = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=256)
    eager = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=256, cuda_graphs=False)
    try:
        a, b = graphed.generate(reqs), eager.generate(reqs)
        assert graphed.graphs is not None and graphed.graphs.graphs, "no decode step was captured"
        assert graphed.stats["graph_failures"] == 0
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=2e-2, rtol=0)
            assert x.routes is not None and torch.equal(x.routes.ids().sort(-1).values, y.routes.ids().sort(-1).values)
    finally:
        graphed.close()
        eager.close()


def test_sampled_logprobs_match_full_forward(model):
    ps = prompts(6, seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=20, ignore_eos=True, seed=5)
    engine = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=256)
    try:
        res = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])
        again = engine.generate([GenerationRequest(prompt_token_ids=ps[2], params=params)])[0]
    finally:
        engine.close()
    assert again.token_ids == res[2].token_ids  # seeded: the same alone as in a batch of 6
    errs = torch.cat([(full_logprobs(model, p, r.token_ids, 0.8) - torch.tensor(r.logprobs)).abs()
                      for p, r in zip(ps, res)])
    # bf16: activations carry ~3 significant digits through 4 layers; logprobs of a 256-way
    # distribution at T=0.8 land within a few hundredths of the full forward's
    assert errs.max().item() < 0.05 and errs.mean().item() < 0.01, (errs.max().item(), errs.mean().item())


def test_decode_step_reads_nothing_back(model):
    """An eager decode step (forward_step) and a graph replay, under CUDA's sync debug mode set to
    error: the host never waits on the device inside a step."""
    engine = EmbeddedEngine(copy.deepcopy(model), max_seqs=4, max_model_len=256)
    try:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts(3, seed=2)])  # compile
        cache, m = engine.cache, engine.model
        slots = [cache.allocate() for _ in range(3)]
        m.forward_step(torch.arange(30, device="cuda") + 2, slots, [10, 10, 10], cache)
        ids = torch.tensor([5, 6, 7], device="cuda")
        m.forward_step(ids, slots, [1, 1, 1], cache)  # compiles the eager decode
        engine.graphs.decode([5, 6, 7], slots)  # captures bucket 4
        sb = SamplingBatch.of([SamplingParams(temperature=1.0, top_k=5)] * 3, [1, 2, 3], [0, 0, 0], "cuda")
        sample(torch.randn(3, VOCAB, device="cuda"), sb)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.forward_step(ids, slots, [1, 1, 1], cache)
            logits, _ = engine.graphs.decode([5, 6, 7], slots)
            sample(logits, sb)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert [cache.seq_len(s) for s in slots] == [14, 14, 14]  # prefill 10, then four decode steps
    finally:
        engine.close()


def prefill_scenario(model, sync_mode: str) -> EmbeddedEngine:
    """Two engine steps on a fresh engine; the second, a chunk of every kind of row, runs under
    `torch.cuda.set_sync_debug_mode(sync_mode)`: a decoding sequence, the rest of a prompt cut by
    the first step (absorbed MLA rows over its cache, Lightning from its saved state), whole
    prompts, a prompt whose twin forks its cache, and a prompt cut at the chunk's end (so only some
    rows sample). 1200 tokens x 8 experts is over the MoE's counting-sort bound: torch sorts."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(2, VOCAB, (40,), generator=g).tolist()
    ps = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (700, 650, 300)] + [shared, shared]
    ps.append(torch.randint(2, VOCAB, (900,), generator=g).tolist())
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=20, max_tokens=8, ignore_eos=True, seed=3)]
    engine = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=2048, max_batch_tokens=1200)
    for i, p in enumerate(ps):
        engine._add(GenerationRequest(prompt_token_ids=p, params=params[i % 2]), concurrent.futures.Future())
    try:
        engine._step()  # the first prompt whole, 500 of the second
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            engine._step()  # 1 decode + the other 150 + 300 + 40 (its twin forks it) + 709 of 900
        finally:
            torch.cuda.set_sync_debug_mode("default")
    except BaseException:
        engine.close()
        raise
    return engine


def test_prefill_step_reads_nothing_back(model):
    """An engine prefill step under CUDA's sync debug mode set to error: the host queues the whole
    step without waiting on the device (no `.item()`, no boolean-mask indexing, no synchronous
    copy). Its one read-back waits on an event after everything is queued, which the mode does
    not count. The first run compiles the kernels at these shapes; the second is the check."""
    prefill_scenario(model, "default").close()
    engine = prefill_scenario(model, "error")
    try:
        seqs = sorted(engine._running, key=lambda s: s.order)
        assert [s.cached for s in seqs] == [701, 650, 300, 40, 40, 709]
        assert [len(s.tokens) for s in seqs] == [2, 1, 1, 1, 1, 0]
        assert engine.stats["forks"] == 1 and engine.stats["steps"] == 2
    finally:
        engine.close()


def test_race_noise_same_on_gpu_and_cpu():
    seeds, steps = torch.tensor([0, 7, 2**62 + 3]), torch.tensor([0, 5, 2**40])
    torch.testing.assert_close(race_noise(seeds.cuda(), steps.cuda(), 4096).cpu(), race_noise(seeds, steps, 4096),
                               atol=0, rtol=1e-6)


def test_shared_prefix_group_equals_unshared(model):
    group = prompts(1, seed=3)[0]
    reqs = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            for p in [group] * 4 + prompts(2, seed=4)]
    shared = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=256)
    plain = EmbeddedEngine(copy.deepcopy(model), max_seqs=8, max_model_len=256, share_prefix=False)
    try:
        a, b = [], []
        for engine, out in ((shared, a), (plain, b)):
            engine.pause()  # the whole group is admitted in one step, before its prompt is prefilled
            futures = [engine.submit(r) for r in reqs]
            engine.resume()
            out.extend(f.result() for f in futures)
    finally:
        shared.close()
        plain.close()
    assert shared.stats["prefill_tokens_saved"] == 3 * len(group)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=2e-2, rtol=0)


def test_inference_lm_head_equals_the_fp32_head(model, monkeypatch):
    """Under no_grad the bf16 model's fp32 LM head runs as the Triton tensor-core GEMM with fp32
    output (kernels/linear: the fp32 weight split into three bf16 pieces, every product exact in
    fp32), so it equals the fp32 head up to summation order."""
    import kernels.linear.gemm as kg

    calls = []
    real = kg.linear_fp32_triton
    monkeypatch.setattr(kg, "linear_fp32_triton", lambda *a: calls.append(1) or real(*a))
    assert model.lm_head.weight.dtype == torch.float32  # Ring-2.6 keeps its head in fp32
    h = torch.randn(300, model.config.hidden_size, device="cuda").bfloat16()
    want = torch.nn.functional.linear(h.double(), model.lm_head.weight.double())
    with torch.no_grad():
        got = model.logits(h)
    assert calls, "the inference LM head did not run the Triton GEMM"
    assert got.dtype == torch.float32 and got.shape == want.shape
    fp32 = torch.nn.functional.linear(h.float(), model.lm_head.weight.float())
    fp32_err = ((fp32 - want).norm() / want.norm()).item()  # cuBLAS's fp32 GEMM on this device
    assert ((got - want).norm() / want.norm()).item() < 4 * max(fp32_err, 1e-6)
