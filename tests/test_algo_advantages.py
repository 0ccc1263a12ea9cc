"""Advantages, dynamic filter and length reward against direct per-group loops over the formulas."""

import math
import statistics

import pytest
import torch

from kpop.algo.advantages import (
    group_index,
    grpo_advantages,
    length_rewards,
    rloo_advantages,
    varied_groups,
)

IDS = ["b", "a", "b", "c", "a", "b", "c", "a"]
REWARDS = [1.0, 0.0, 0.5, 2.0, 1.0, 0.0, 2.0, 0.25]


def _members(ids):
    out = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def test_group_index_dense_in_first_seen_order():
    assert group_index(IDS).tolist() == [0, 1, 0, 2, 1, 0, 2, 1]


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_loop(normalize_std):
    got = grpo_advantages(torch.tensor(REWARDS), group_index(IDS), normalize_std=normalize_std)
    for g, idx in _members(IDS).items():
        rs = [REWARDS[i] for i in idx]
        mean, std = statistics.mean(rs), statistics.stdev(rs)
        for i in idx:
            want = (REWARDS[i] - mean) / (std + 1e-6) if normalize_std else REWARDS[i] - mean
            assert math.isclose(got[i].item(), want, rel_tol=1e-5, abs_tol=1e-6), (g, i)


def test_grpo_accepts_sparse_unsorted_group_ids():
    a = grpo_advantages(torch.tensor(REWARDS), torch.tensor([70, 5, 70, 9, 5, 70, 9, 5]))
    b = grpo_advantages(torch.tensor(REWARDS), group_index(IDS))
    torch.testing.assert_close(a, b)


def test_rloo_matches_loop():
    got = rloo_advantages(torch.tensor(REWARDS), group_index(IDS))
    for idx in _members(IDS).values():
        for i in idx:
            others = [REWARDS[j] for j in idx if j != i]
            assert math.isclose(got[i].item(), REWARDS[i] - sum(others) / len(others), abs_tol=1e-6)


def test_rloo_rejects_singleton_group():
    with pytest.raises(ValueError, match="RLOO needs every group"):
        rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="rewards and groups"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="long tensor"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))


def test_dynamic_filter_drops_zero_variance_groups():
    keep = varied_groups(torch.tensor(REWARDS), group_index(IDS))
    for idx in _members(IDS).values():
        varied = len({REWARDS[i] for i in idx}) > 1
        assert all(keep[i].item() == varied for i in idx)
    assert keep.tolist().count(False) == 2  # group "c" (2.0, 2.0)


def test_length_reward_matches_formula():
    lengths = [10, 30, 20, 5, 5, 50, 7, 12]
    correct = [1, 0, 1, 1, 0, 1, 0, 1]
    got = length_rewards(torch.tensor(lengths), torch.tensor(correct), group_index(IDS))
    for idx in _members(IDS).values():
        lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
        for i in idx:
            p = 0.5 - (lengths[i] - lo) / (hi - lo + 1e-9)
            want = p if correct[i] else min(p, 0.0)
            assert math.isclose(got[i].item(), want, abs_tol=1e-6)
    # the shortest correct answer of a group earns the most
    assert got[0].item() == pytest.approx(0.5)
