"""Packing under a token budget, and packed (varlen) logprobs == one-sequence-at-a-time logprobs."""

import random

import pytest
import torch

from kpop.policy.model import BailingMoeV2_5ForCausalLM
from kpop.policy.presets import tiny_config
from learner.packing import flat, pack, plan_micro_batches, token_logprobs


def test_plan_respects_budget_and_uses_every_sequence_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(40)]
    plan = plan_micro_batches(lengths, 64)
    assert sorted(i for b in plan for i in b) == list(range(40))
    assert all(sum(lengths[i] for i in b) <= 64 for b in plan)
    assert len(plan) <= -(-sum(lengths) // 64) + 3  # first-fit-decreasing packs tightly
    assert plan == plan_micro_batches(lengths, 64)  # deterministic


def test_plan_names_a_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 1 has 70 tokens.*micro_batch_tokens=64"):
        plan_micro_batches([10, 70], 64)
    with pytest.raises(ValueError, match="empty"):
        plan_micro_batches([0], 64)


def test_pack_cu_seqlens_and_flat_order():
    seqs = [[5, 6, 7], [8], [9, 10]]
    p = pack(seqs, [2, 0])
    assert p.input_ids.tolist() == [[9, 10, 5, 6, 7]]
    assert p.cu_seqlens.tolist() == [0, 2, 5] and p.cu_seqlens.dtype == torch.int32
    assert flat([[1, 2, 3], [4], [5, 6]], [2, 0], torch.long).tolist() == [5, 6, 1, 2, 3]


def test_packed_logprobs_equal_per_sequence_logprobs():
    torch.manual_seed(0)
    model = BailingMoeV2_5ForCausalLM(tiny_config()).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (9, 17, 4, 30)]
    with torch.no_grad():
        p = pack(seqs, [0, 1, 2, 3])
        packed = token_logprobs(model(p.input_ids, cu_seqlens=p.cu_seqlens).logits, p.input_ids)
        cu = p.cu_seqlens.tolist()
        for j, s in enumerate(seqs):
            ids = torch.tensor([s])
            alone = token_logprobs(model(ids).logits, ids)
            # position 0 of each sequence has no context; every later token must agree
            torch.testing.assert_close(packed[cu[j] + 1 : cu[j + 1]], alone[1:], rtol=1e-4, atol=1e-4)
