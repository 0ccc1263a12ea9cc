"""bf16 storage of the Lightning recurrent states (`rollout.lightning_state_dtype`): every step
computes in fp32 and rounds the state once, when it stores it.

Kernels run on CPU under TRITON_INTERPRET=1 (the compiled kernels on a CUDA machine); the engine
tests run the tiny policy on CPU (torch kernels); the last tests need a GPU and skip without one.
"""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from kernels.lightning import lightning_attn, lightning_decode, recurrent_lightning  # noqa: E402
from kpop.config import RolloutConfig  # noqa: E402
from kpop.policy.cache import HybridCache  # noqa: E402
from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.presets import tiny_config  # noqa: E402
from kpop.rollout.embedded import EmbeddedEngine  # noqa: E402
from kpop.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from kpop.rollout.worker import build_engine, cache_blocks  # noqa: E402
from numerics import relerr  # noqa: E402
# the GPU cases share test_engine_gpu.py's model shape, prompts and full-forward logprobs
from test_engine_gpu import REAL_HEADS, full_logprobs  # noqa: E402
from test_engine_gpu import prompts as gpu_prompts  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256


# (batch, heads, K, V, slots): tiny (V not a power of two: masked value tiles), and on a GPU the
# real head size (128) at a decode batch
SHAPES = [(3, 2, 16, 40, 6), pytest.param((64, 16, 128, 128, 96), marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the real shape is for the compiled kernel"))]


def _step_inputs(B: int, H: int, K: int, V: int, dtype: torch.dtype):
    q, k = (torch.randn(B, H, K, device=DEV, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, V, device=DEV, dtype=dtype)
    return q, k, v, -torch.rand(H, device=DEV) * 0.3 - 0.01


def _operand_size(pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per state element, |old state| + |k v|: what the step's fp32 rounding is relative to (a
    new state near 0 from cancellation carries the operands' error, not its own size's)."""
    mag = pool.float().abs()
    mag[slots] += (k.float()[..., :, None] * v.float()[..., None, :]).abs()
    return mag


def _assert_a_rounding_apart(a: torch.Tensor, b: torch.Tensor, mag: torch.Tensor, seed: int) -> None:
    """bf16 states from fp32 values a few fp32 ulps (of the operands) apart: equal in all but 0.1%
    of the elements, and there at most one bf16 step apart (2^-7 relative: bf16 keeps 8 bits) plus
    those fp32 ulps."""
    differ = a != b
    assert differ.float().mean() <= 1e-3, f"{int(differ.sum())} of {a.numel()} state elements differ (seed {seed})"
    step = torch.maximum(a.float().abs(), b.float().abs()) * 2.0 ** -7 + mag * 2.0 ** -20
    assert ((a.float() - b.float()).abs() <= step)[differ].all(), f"seed {seed}"


# -- the kernels -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_step_is_the_fp32_step_rounded_once(kernels, dtype, shape, seed, monkeypatch):
    """From the same state values, a bf16 pool ends the step holding exactly the fp32 pool's new
    state rounded to nearest bf16, and the output is the fp32 pool's bit for bit (it reads the
    state before the rounding). Slots not stepped stay as they were."""
    monkeypatch.setenv("KPOP_KERNELS", kernels)
    B, H, K, V, S = shape
    q, k, v, g = _step_inputs(B, H, K, V, dtype)
    half = (torch.randn(S, H, K, V, device=DEV) * 4).to(torch.bfloat16)
    full = half.float()
    slots = torch.randperm(S, device=DEV)[:B]
    mag = _operand_size(half, slots, k, v)
    o_half = lightning_decode(q, k, v, g, half, slots, scale=0.25)
    o_full = lightning_decode(q, k, v, g, full, slots, scale=0.25)
    assert half.dtype == torch.bfloat16 and o_half.dtype == dtype
    if DEV == "cuda" and kernels == "triton":
        # compiled, the two storage variants may contract the multiply-add differently: a few fp32
        # ulps of the operands apart before the store, so at most a rounding apart after it
        _assert_a_rounding_apart(half, full.to(torch.bfloat16), mag, seed)
        assert relerr(o_half, o_full) < (1e-6 if dtype == torch.float32 else 1e-2), f"seed {seed}"
    else:
        assert torch.equal(half, full.to(torch.bfloat16)), f"seed {seed}"
        assert torch.equal(o_half, o_full), f"seed {seed}"
    assert not torch.equal(full[slots], full[slots].to(torch.bfloat16).float())  # the rounding mattered


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bf16_step_equals_the_torch_reference(dtype, shape, seed, monkeypatch):
    """The Triton decode step and the torch reference, both on bf16 pools from the same values:
    the stored states are equal bit for bit but where their fp32 values before the rounding already
    differ in the last bit (the interpreter takes exp from numpy, the GPU from ex2.approx and may
    fuse the multiply-add; 1 fp32 ulp apart flips a bf16 rounding about once in 2^16 elements):
    there one bf16 step apart, in at most 0.1% of the elements. Outputs as close as fp32 ones."""
    B, H, K, V, S = shape
    q, k, v, g = _step_inputs(B, H, K, V, dtype)
    pool = (torch.randn(S, H, K, V, device=DEV) * 4).to(torch.bfloat16)
    ref = pool.clone()
    slots = torch.randperm(S, device=DEV)[:B]
    mag = _operand_size(pool, slots, k, v)
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    o = lightning_decode(q, k, v, g, pool, slots, scale=0.25)
    monkeypatch.setenv("KPOP_KERNELS", "torch")
    o_ref = lightning_decode(q, k, v, g, ref, slots, scale=0.25)
    _assert_a_rounding_apart(pool, ref, mag, seed)
    # fp32 outputs: summation order only; bf16 outputs: the interpreter's cast of o truncates
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert relerr(o, o_ref) < tol, f"output rel err {relerr(o, o_ref):.2e} (seed {seed})"


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_prefill_then_bf16_decode_stays_near_the_exact_recurrence(kernels, seed, monkeypatch):
    """A prompt's final state stored in bf16, then 64 decode steps on the bf16 pool, against the
    float64 recurrence. Each store rounds the state by ~1e-3 of its size (rms; 2^-9 at most) and
    the decay only partly forgets old roundings: at lam = 0.99, the slowest head here, the 65
    roundings add up to sqrt(sum lam^2j) ~ 6 of them, ~7e-3 (measured 2.6e-3 to 7.6e-3 over 8
    seeds). Bound 2e-2; an fp32 pool stays near 1e-6 (bound 1e-4), so the bf16 error must be far above
    it (the states really were rounded)."""
    monkeypatch.setenv("KPOP_KERNELS", kernels)
    B, T, steps, H, K, V = 2, 40, 64, 2, 16, 32
    q = torch.randn(B, T + steps, H, K, device=DEV)
    k = torch.randn(B, T + steps, H, K, device=DEV)
    v = torch.randn(B, T + steps, H, V, device=DEV)
    g = -torch.rand(H, device=DEV) * 0.3 - 0.01
    o_ref, s_ref = recurrent_lightning(q.double(), k.double(), v.double(), g, K ** -0.5, None, True)
    errs = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        _, ht = lightning_attn(q[:, :T], k[:, :T], v[:, :T], g, output_final_state=True)
        pool = torch.zeros(B + 1, H, K, V, device=DEV, dtype=state_dtype)
        slots = torch.tensor([2, 0], device=DEV)
        pool[slots] = ht.to(state_dtype)
        o = torch.stack([lightning_decode(q[:, t], k[:, t], v[:, t], g, pool, slots) for t in range(T, T + steps)], 1)
        errs[state_dtype] = relerr(o, o_ref[:, T:]), relerr(pool[slots], s_ref)
    (o32, s32), (o16, s16) = errs[torch.float32], errs[torch.bfloat16]
    assert o16 < 2e-2 and s16 < 2e-2, f"bf16 pool: outputs {o16:.2e}, state {s16:.2e} (seed {seed})"
    assert o32 < 1e-4 and s32 < 1e-4 and o16 > 10 * o32, f"fp32 {o32:.2e}/{s32:.2e}, bf16 {o16:.2e} (seed {seed})"


# -- the option: cache, engine, config -------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=VOCAB), seed=0).eval()


def test_a_bad_state_dtype_is_refused_by_name(model):
    for bad in ("float16", "bf16", torch.float16, torch.float64):
        with pytest.raises(ValueError, match=r"lightning_state_dtype must be 'float32' or 'bfloat16' .*, got"):
            HybridCache.for_model(model, max_seqs=2, num_blocks=8, state_dtype=bad)
    with pytest.raises(ValueError, match=r"lightning_state_dtype must be 'float32' or 'bfloat16' .*, got 'fp16'"):
        EmbeddedEngine(model, max_seqs=2, lightning_state_dtype="fp16")
    with pytest.raises(ValidationError, match="lightning_state_dtype"):
        RolloutConfig(lightning_state_dtype="float16")
    with pytest.raises(ValidationError, match="lightning_state_dtype 'bfloat16' applies to the embedded engine"):
        RolloutConfig(engine="vllm", lightning_state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"lightning_decode: state must be fp32 or bf16"):
        lightning_decode(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 4), -torch.rand(2),
                         torch.zeros(2, 2, 8, 4, dtype=torch.float16))


def test_the_default_stays_fp32_and_the_config_reaches_the_cache(model):
    assert RolloutConfig().lightning_state_dtype == "float32"
    for cfg, want in [(RolloutConfig(), torch.float32),
                      (RolloutConfig(lightning_state_dtype="bfloat16"), torch.bfloat16)]:
        engine = build_engine(cfg, model, None)
        try:
            assert engine.cache.state_dtype == want and all(s.dtype == want for s in engine.cache.state)
            assert all(kv.dtype == torch.float32 for kv in engine.cache.kv)  # the latent cache follows the model
        finally:
            engine.close()
    # a colocated engine's cache is sized with the states at their stored size
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    r32 = RolloutConfig(max_concurrent_episodes=64, max_episode_tokens=63)
    r16 = r32.model_copy(update={"lightning_state_dtype": "bfloat16"})
    shape = model.cache_shape()
    state32 = 64 * shape.num_linear_layers * shape.linear_heads * shape.linear_head_dim ** 2 * 4
    per_block = shape.num_mla_layers * 16 * shape.latent_dim * 4
    budget = weights + state32 + 50 * per_block
    assert cache_blocks(model, r32, budget, 16) == 50
    assert cache_blocks(model, r16, budget, 16) == 50 + state32 // 2 // per_block


def recompute(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The learner's side: a full fp32 forward over prompt + tokens, each token's logprob."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_engine_with_bf16_states_stays_near_the_learner_and_the_fp32_engine(model):
    """Greedy, 64 tokens each, tiny policy in fp32. The learner's full forward over the bf16-state
    engine's own tokens gives logprobs within 0.04 (max) and 0.005 (mean) of the engine's: measured
    ~0.013 / 0.002 over six prompt sets (one bf16 rounding of each state per step, through 6
    Lightning layers). The fp32-state engine stays at 1e-4. Where the two engines' greedy tokens
    agree (a random tiny policy has near ties, so they part after 10 to 60 tokens) their logprobs
    are as close."""
    ps = prompts(8, seed=0)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in ps]
    out = {}
    for dtype in ("float32", "bfloat16"):
        engine = EmbeddedEngine(model, max_seqs=8, block_size=4, num_blocks=512, lightning_state_dtype=dtype)
        try:
            out[dtype] = engine.generate(reqs)
        finally:
            engine.close()
    d32, d16 = ([(recompute(model, p, r.token_ids) - torch.tensor(r.logprobs)).abs() for p, r in zip(ps, out[dt])]
                for dt in ("float32", "bfloat16"))
    assert all(len(r.token_ids) == 64 for r in out["bfloat16"])
    assert max(d.max().item() for d in d32) < 1e-4
    d16 = torch.cat(d16)
    assert d16.max().item() < 0.04 and d16.mean().item() < 0.005, (d16.max().item(), d16.mean().item())
    assert d16.mean().item() > 1e-4  # the states really were bf16
    for a, b in zip(out["float32"], out["bfloat16"]):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), 64)
        assert n >= 1
        assert (torch.tensor(a.logprobs[:n]) - torch.tensor(b.logprobs[:n])).abs().max().item() < 0.04


def test_forks_and_preemption_copy_and_rebuild_bf16_states(model):
    """`HybridCache.fork` copies a bf16 state exactly; a shared group in the engine gives what
    prefilling each request alone gives (logprobs within 1e-3, not 1e-5 as with fp32 states:
    a prompt prefilled in another batch ends in an fp32 state a few last bits apart, which can
    flip a bf16 rounding; measured 3e-5); preempted requests re-prefill into bf16 states and stay
    as near the learner as requests that never left."""
    cache = HybridCache.for_model(model, max_seqs=3, num_blocks=16, block_size=4, state_dtype="bfloat16")
    x, y = cache.allocate(), cache.allocate()
    model.forward_step(torch.randint(2, VOCAB, (10,), generator=torch.Generator().manual_seed(5)), [x], [10], cache)
    cache.fork(x, y)
    assert all(s.dtype == torch.bfloat16 and torch.equal(s[x], s[y]) and s[x].abs().sum() > 0 for s in cache.state)
    out = model.forward_step(torch.tensor([5, 5]), [x, y], [1, 1], cache)
    assert torch.equal(out[0], out[1]) and all(torch.equal(s[x], s[y]) for s in cache.state)

    group = prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in [group] * 4 + prompts(2, seed=4)]
    kw = dict(max_seqs=8, block_size=4, lightning_state_dtype="bfloat16")
    shared = EmbeddedEngine(model, num_blocks=256, **kw)
    plain = EmbeddedEngine(model, num_blocks=256, share_prefix=False, **kw)
    tight = EmbeddedEngine(model, num_blocks=24, share_prefix=False, **kw)
    try:
        shared.pause()  # the group arrives together, before its leader's prefill: sharing applies
        futures = [shared.submit(r) for r in reqs]
        shared.resume()
        a, b = [f.result() for f in futures], plain.generate(reqs)
        c = tight.generate(reqs)
    finally:
        for e in (shared, plain, tight):
            e.close()
    assert shared.stats["forks"] == 3 and tight.stats["preemptions"] > 0
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-3, rtol=0)
    for r, req in zip(c, reqs):
        delta = (recompute(model, req.prompt_token_ids, r.token_ids) - torch.tensor(r.logprobs)).abs().max().item()
        assert delta < 0.04, delta


# -- on a GPU: CUDA-graph decode with bf16 states ---------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_model():
    # every expert routed (as in test_engine_gpu.py): a near-tie expert flipped by rounding is not
    # what these tests are about
    return build_model(tiny_config(VOCAB, **REAL_HEADS, num_experts_per_tok=8, topk_group=4), seed=0,
                       device="cuda", dtype="bfloat16").eval()


@pytest.mark.gpu
@gpu
def test_gpu_graph_decode_equals_eager_with_bf16_states(gpu_model):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    reqs = [GenerationRequest(prompt_token_ids=p, params=params) for p in gpu_prompts(5, seed=0)]  # bucket 8
    graphed = EmbeddedEngine(copy.deepcopy(gpu_model), max_seqs=8, max_model_len=256, lightning_state_dtype="bfloat16")
    eager = EmbeddedEngine(copy.deepcopy(gpu_model), max_seqs=8, max_model_len=256, cuda_graphs=False,
                           lightning_state_dtype="bfloat16")
    try:
        a, b = graphed.generate(reqs), eager.generate(reqs)
        assert graphed.graphs is not None and graphed.graphs.graphs, "no decode step was captured"
        assert graphed.stats["graph_failures"] == 0
        assert all(s.dtype == torch.bfloat16 for s in graphed.cache.state)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=2e-2, rtol=0)
    finally:
        graphed.close()
        eager.close()


@pytest.mark.gpu
@gpu
def test_gpu_bf16_state_logprobs_stay_near_the_full_forward(gpu_model):
    """Sampled at T=0.8 with bf16 states, against a full bf16 forward: the bound of the fp32-state
    engine's test (tests/test_engine_gpu.py: max 0.05, mean 0.01) with the states' rounding on top."""
    ps = gpu_prompts(6, seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=32, ignore_eos=True, seed=5)
    engine = EmbeddedEngine(copy.deepcopy(gpu_model), max_seqs=8, max_model_len=256, lightning_state_dtype="bfloat16")
    try:
        res = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in ps])
    finally:
        engine.close()
    errs = torch.cat([(full_logprobs(gpu_model, p, r.token_ids, 0.8) - torch.tensor(r.logprobs)).abs()
                      for p, r in zip(ps, res)])
    assert errs.max().item() < 0.08 and errs.mean().item() < 0.015, (errs.max().item(), errs.mean().item())
