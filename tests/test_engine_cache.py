"""HybridCache pieces the GPU engine relies on, checked on CPU: device block tables kept in step
with the host's block lists, the scratch slot and block that pad CUDA-graph batches, the length
bound, and `fork` (shared-prefix groups)."""

from __future__ import annotations

import pytest
import torch

from kpop.policy.cache import CacheFull, HybridCache
from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=128), seed=0).eval()


def test_device_tables_follow_the_block_lists_and_scratch_is_outside_the_pools(model):
    cache = HybridCache.for_model(model, max_seqs=3, num_blocks=10, block_size=4, max_seq_len=20)
    assert cache.max_blocks_per_seq == 5 and cache.scratch_slot == 3 and cache.scratch_block == 10
    assert all(kv.shape[0] == 11 for kv in cache.kv) and all(s.shape[0] == 4 for s in cache.state)
    a, b = cache.allocate(), cache.allocate()
    cache.reserve([a, b], [9, 3])
    cache.advance([a, b], [9, 3])
    cache.reserve([b], [2])
    table = cache.block_table([a, b])
    assert table.shape == (2, 3)
    assert table[0].tolist() == cache._blocks[a] and table[1, :2].tolist() == cache._blocks[b]
    assert cache.tables[cache.scratch_slot].tolist() == [10] * 5  # padding rows read the scratch block
    assert 10 not in cache._free_blocks and cache.num_free_blocks == 10 - 5
    cache.free(a)
    c = cache.allocate()
    cache.reserve([c], [4])
    assert cache.block_table([c])[0].tolist() == cache._blocks[c]  # a reused slot's row is rewritten


def test_a_sequence_past_max_seq_len_is_refused_before_anything_moves(model):
    cache = HybridCache.for_model(model, max_seqs=2, num_blocks=20, block_size=4, max_seq_len=8)
    a, b = cache.allocate(), cache.allocate()
    free = cache.num_free_blocks
    with pytest.raises(CacheFull, match="over max_seq_len 8"):
        cache.reserve([a, b], [4, 9])
    assert cache.num_free_blocks == free and cache._blocks[a] == []


def test_fork_gives_a_copy_that_continues_like_the_original(model):
    cache = HybridCache.for_model(model, max_seqs=3, num_blocks=16, block_size=4)
    ids = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(0))
    a, b = cache.allocate(), cache.allocate()
    model.forward_step(ids, [a], [10], cache)
    cache.fork(a, b)
    assert cache.seq_len(b) == 10 and set(cache._blocks[a]).isdisjoint(cache._blocks[b])
    for s in cache.state:
        assert torch.equal(s[a], s[b])
    nxt = torch.tensor([5, 5])
    out = model.forward_step(nxt, [a, b], [1, 1], cache)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already holds"):
        cache.fork(a, b)
    tight = HybridCache.for_model(model, max_seqs=2, num_blocks=4, block_size=4)
    x, y = tight.allocate(), tight.allocate()
    model.forward_step(ids, [x], [10], tight)
    with pytest.raises(CacheFull):
        tight.fork(x, y)
    assert tight.seq_len(y) == 0 and tight._blocks[y] == []


def test_a_step_hands_the_prefill_kernel_its_longest_fresh_length(model, monkeypatch):
    """The host knows every query length: the MLA prefill gets the longest fresh one (prompts
    without cache) instead of reading it back from the device; continuing and decoding sequences
    do not count."""
    import kpop.policy.model as pm

    seen = []
    real = pm.mla_prefill
    monkeypatch.setattr(pm, "mla_prefill", lambda *a, **kw: seen.append(kw["max_seqlen"]) or real(*a, **kw))
    cache = HybridCache.for_model(model, max_seqs=4, num_blocks=32, block_size=4)
    a, b, c, d = (cache.allocate() for _ in range(4))
    g = torch.Generator().manual_seed(0)
    model.forward_step(torch.randint(0, 128, (9,), generator=g), [a, b], [5, 4], cache)
    assert seen and set(seen) == {5}
    seen.clear()
    # b continues its prompt (9 more tokens, more than either fresh one), a decodes, c and d start
    lens = [1, 9, 7, 3]
    model.forward_step(torch.randint(0, 128, (sum(lens),), generator=g), [a, b, c, d], lens, cache)
    mla_layers = model.config.mixer_types().count("attention")
    assert seen == [7] * mla_layers
    seen.clear()
    cache.reserve([b, c], [2, 2])
    ctx, _ = model._step_context([b, c], [2, 2], cache, torch.device("cpu"))
    assert ctx.fresh_max_len is None and ctx.fresh_tokens.numel() == 0
