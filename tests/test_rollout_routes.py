"""An engine's routing passes assembled into a request's `Routes` (kpop/rollout/routes.py)."""

from __future__ import annotations

import pytest
import torch

from kpop.rollout.routes import routes_from_passes


def chunk(n: int, value: int) -> torch.Tensor:
    return torch.full((n, 2, 3), value, dtype=torch.uint8)


def test_a_later_pass_overwrites_and_unfed_tokens_have_no_route():
    # prefill of 4, two decodes, then a re-prefill of the first 5 (a weight update), one decode
    passes = [(0, chunk(4, 1)), (4, chunk(1, 2)), (5, chunk(1, 3)), (0, chunk(5, 7)), (5, chunk(1, 9))]
    ids = routes_from_passes(passes, num_tokens=8, num_experts=16).ids()
    assert ids.shape == (8, 2, 3)
    assert [int(ids[t, 0, 0]) for t in range(8)] == [7, 7, 7, 7, 7, 9, -1, -1]


def test_rows_past_the_context_are_dropped_and_no_pass_is_no_routes():
    # an engine scheduling ahead fed one token beyond the 3 it returned
    ids = routes_from_passes([(0, chunk(2, 4)), (2, chunk(2, 5))], num_tokens=3, num_experts=300).ids()
    assert ids.shape == (3, 2, 3) and [int(ids[t, 1, 2]) for t in range(3)] == [4, 4, 5]
    assert routes_from_passes([], num_tokens=3, num_experts=16) is None


def test_an_expert_id_out_of_range_is_refused():
    """A route is replayed by the learner as an index into its experts: an id the engine (or a
    vLLM recorder) reports past the expert count, or negative, is an error naming the range,
    never a wrapped or clipped id."""
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        routes_from_passes([(0, chunk(2, 1)), (2, chunk(1, 16))], num_tokens=3, num_experts=16)
    wide = torch.full((2, 2, 3), 5, dtype=torch.int32)
    wide[1, 0, 2] = -1  # int32 rows (more than 256 experts) would wrap to 65535 as uint16
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        routes_from_passes([(0, wide)], num_tokens=2, num_experts=300)
    # rows dropped past the context are not checked: they are never replayed
    assert routes_from_passes([(0, chunk(2, 1)), (2, chunk(1, 99))], num_tokens=2, num_experts=16) is not None
