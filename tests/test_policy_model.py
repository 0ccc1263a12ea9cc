"""Ring-2.6 model (kpop/policy/model.py) on a tiny fp32 config: cache equivalence, MoE routing,
gradients, learning, HF integration."""

from __future__ import annotations

import math

import pytest
import torch

from kpop.policy.cache import CacheFull, HybridCache
from kpop.policy.checkpoint import build_model
from kpop.policy.model import BailingMoeV2_5ForCausalLM, SparseMoeBlock, alibi_slopes
from kpop.policy.presets import tiny_config

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops gain nothing from intra-op threads, and on a shared 2-core box spinning OpenMP
    # workers make them ~10x slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model() -> BailingMoeV2_5ForCausalLM:
    m = build_model(tiny_config(VOCAB), seed=0).eval()
    with torch.no_grad():  # a random non-zero expert bias: selection must differ from weighting
        for mod in m.modules():
            if hasattr(mod, "expert_bias"):
                mod.expert_bias.uniform_(-0.05, 0.05)
    return m


def test_tiny_config_mixes_both_attention_kinds(model):
    kinds = model.config.mixer_types()
    assert kinds.count("attention") == 2 and kinds.count("linear_attention") == 6
    assert [type(l.attention).__name__ for l in model.model.layers[:8]][3] == "MultiLatentAttention"
    assert type(model.model.layers[0].mlp).__name__ == "MLP"  # first_k_dense_replace = 1
    assert isinstance(model.model.layers[1].mlp, SparseMoeBlock)


def test_packed_equals_separate(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, VOCAB, (7,), generator=g), torch.randint(0, VOCAB, (12,), generator=g)
    packed = model(torch.cat([a, b])[None], cu_seqlens=torch.tensor([0, 7, 19])).logits[0]
    la, lb = model(a[None]).logits[0], model(b[None]).logits[0]
    torch.testing.assert_close(packed[:7], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[7:], lb, atol=1e-5, rtol=1e-5)


def test_prefill_equals_token_by_token_decode(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (1, 5, 11, 18)]
    full = [model(p[None]).logits[0] for p in prompts]

    # batched prefill of every prompt but its last 3 tokens (the 1-token prompt decodes only)
    cache = HybridCache.for_model(model, max_seqs=4, num_blocks=32, block_size=4)
    slots = [cache.allocate() for _ in prompts]
    starts = [max(len(p) - 3, 0) for p in prompts]
    pre = [(s, p[:n]) for s, p, n in zip(slots, prompts, starts) if n > 0]
    out = model.forward_step(torch.cat([p for _, p in pre]), [s for s, _ in pre], [len(p) for _, p in pre], cache)
    for (s, p), row in zip(pre, out):
        torch.testing.assert_close(row, full[slots.index(s)][len(p) - 1], atol=1e-5, rtol=1e-4)
    # then batched decode, one token per sequence per step, sequences dropping out as they end
    for t in range(3):
        live = [i for i, p in enumerate(prompts) if starts[i] + t < len(p)]
        ids = torch.stack([prompts[i][starts[i] + t] for i in live])
        out = model.forward_step(ids, [slots[i] for i in live], [1] * len(live), cache)
        for i, row in zip(live, out):
            torch.testing.assert_close(row, full[i][starts[i] + t], atol=1e-5, rtol=1e-4)
    assert [cache.seq_len(s) for s in slots] == [len(p) for p in prompts]


def test_append_several_tokens_to_cached_sequence(model):
    """Resume / multi-turn: a chunk appended to a cached sequence, mixed with a decode and a new prompt."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, VOCAB, (n,), generator=g) for n in (14, 9, 6))
    full_a, full_b, full_c = (model(x[None]).logits[0] for x in (a, b, c))
    cache = HybridCache.for_model(model, max_seqs=3, num_blocks=16, block_size=4)
    sa, sb = cache.allocate(), cache.allocate()
    model.forward_step(torch.cat([a[:6], b[:8]]), [sa, sb], [6, 8], cache)
    sc = cache.allocate()
    out = model.forward_step(torch.cat([a[6:14], b[8:9], c]), [sa, sb, sc], [8, 1, 6], cache, all_logits=True)
    torch.testing.assert_close(out[:8], full_a[6:14], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[8], full_b[8], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[9:], full_c, atol=1e-5, rtol=1e-4)
    # freeing returns blocks and the slot; a re-used slot starts from a clean state
    free_before = cache.num_free_blocks
    cache.free(sa)
    assert cache.num_free_blocks == free_before + 4 and cache.num_free_slots == 1
    s = cache.allocate()
    torch.testing.assert_close(model.forward_step(c, [s], [6], cache)[0], full_c[-1], atol=1e-5, rtol=1e-4)


def test_cache_full_is_raised_before_any_write(model):
    cache = HybridCache.for_model(model, max_seqs=2, num_blocks=2, block_size=4)
    s = cache.allocate()
    model.forward_step(torch.arange(6), [s], [6], cache)
    state_before = [t.clone() for t in cache.state]
    with pytest.raises(CacheFull, match="needs 1 more blocks"):
        model.forward_step(torch.arange(3), [s], [3], cache)
    assert cache.seq_len(s) == 6 and all(torch.equal(a, b) for a, b in zip(state_before, cache.state))
    with pytest.raises(ValueError, match="query_lens sum"):
        model.forward_step(torch.arange(2), [s], [3], cache)
    with pytest.raises(KeyError, match="not allocated"):
        model.forward_step(torch.arange(1), [1], [1], cache)
    cache.allocate()
    with pytest.raises(CacheFull, match="slots"):
        cache.allocate()


def _loop_moe(block: SparseMoeBlock, x: torch.Tensor, cfg) -> tuple[torch.Tensor, list[set[int]]]:
    """The routing formulas written out token by token, expert by expert."""
    gate = block.gate
    E, G = cfg.num_experts, cfg.n_group
    per_group = E // G
    outs, chosen_sets = [], []
    for tok in x:
        s = [1 / (1 + math.exp(-float(tok.double() @ gate.weight[e].double()))) for e in range(E)]
        biased = [s[e] + float(gate.expert_bias[e]) for e in range(E)]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: -group_score[g])[: cfg.topk_group]
        candidates = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
        norm = sum(s[e] for e in chosen)
        y = block.shared_experts(tok)
        for e in chosen:
            y = y + (s[e] / norm) * cfg.routed_scaling_factor * block.experts[e](tok)
        outs.append(y)
        chosen_sets.append(set(chosen))
    return torch.stack(outs), chosen_sets


def test_moe_routing_matches_loop_reference(model):
    block = model.model.layers[2].mlp
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, model.config.hidden_size, generator=g)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5, generator=g)  # spread scores so the groups matter
        block.gate.expert_bias.uniform_(-0.3, 0.3, generator=g)
        idx, w = block.gate(x)
        got = block(x)
        ref, chosen = _loop_moe(block, x, model.config)
    assert [set(r.tolist()) for r in idx] == chosen
    torch.testing.assert_close(w.sum(-1), torch.full((40,), model.config.routed_scaling_factor))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the bias changes which experts are picked, never their weights: weights are unbiased scores
    scores = torch.sigmoid(x @ block.gate.weight.T)
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * model.config.routed_scaling_factor)


def test_lightning_decay_offset_is_a_config_field():
    L, H = 8, 4
    for offset in (0, 1):
        m = build_model(tiny_config(VOCAB, linear_decay_offset=offset), seed=0)
        for l in (0, 5):
            expect = torch.tensor([-s * (1 - (l - offset) / (L - 1) + 1e-5) for s in alibi_slopes(H)])
            torch.testing.assert_close(m.model.layers[l].attention.g_gamma, expect)
    assert alibi_slopes(6)[:4] == alibi_slopes(4)  # non-power-of-two rule keeps the p-head prefix


def test_gradients_reach_every_learnable_parameter():
    m = build_model(tiny_config(VOCAB), seed=0).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 48), generator=g)
    out = m(ids, labels=ids, cu_seqlens=torch.tensor([0, 20, 48]))
    assert out.mtp_logits is not None and len(out.mtp_logits) == 1
    out.loss.backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # experts a batch never routes to get no gradient by design; everything else must learn
    dead = [n for n in dead if ".experts." not in n]
    assert dead == []
    routed = sum(p.grad is not None for n, p in m.named_parameters() if ".experts." in n)
    assert routed > 0
    assert "expert_bias" not in {n.split(".")[-1] for n, _ in m.named_parameters()}
    # the bias and the load it is moved by are buffers: no gradient ever reaches them
    assert {n.split(".")[-1] for n, _ in m.named_buffers() if "gate" in n} == {"expert_bias", "expert_load"}


def test_tiny_model_learns_a_next_token_task():
    """Sequences that count up mod 16 from a random start: next token = current + 1."""
    m = build_model(tiny_config(VOCAB, num_nextn_predict_layers=0, num_hidden_layers=4), seed=0).train()
    assert m.config.mixer_types() == ["linear_attention"] * 3 + ["attention"]
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(6)
    losses = []
    for _ in range(25):
        start = torch.randint(0, 16, (8, 1), generator=g)
        ids = (start + torch.arange(12)) % 16 + 10
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # ~ln(128) at init
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]


def test_hf_generate_matches_cached_greedy_decode(model):
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_config(model.config).__class__ is BailingMoeV2_5ForCausalLM
    prompt = torch.tensor([[5, 17, 33, 2, 9]])
    hf = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=None)
    cache = HybridCache.for_model(model, max_seqs=1, num_blocks=8, block_size=4)
    s = cache.allocate()
    logits = model.forward_step(prompt[0], [s], [5], cache)
    toks = []
    for _ in range(6):
        toks.append(int(logits[0].argmax()))
        logits = model.forward_step(torch.tensor(toks[-1:]), [s], [1], cache)
    assert hf[0, 5:].tolist() == toks


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="cu_seqlens packs"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="rise strictly"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="padding masks"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="num_experts"):
        build_model(tiny_config(VOCAB, num_experts=6))
