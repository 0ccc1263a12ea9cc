"""bench/corrections.py's pure helpers: the statistics it reports from a run's metrics rows."""

import math

import pytest

from bench.corrections import aggregate, fmt, grad_spikes, mean_se, run_stats, table


def test_mean_se_is_the_standard_error_of_the_mean():
    mean, se = mean_se([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(((0.3**2 + 0.1**2 + 0.4**2) / 2) / 3))
    assert mean_se([0.7]) == (0.7, None)  # one seed: no spread to report
    assert mean_se([]) == (None, None)
    assert mean_se([None, 0.5, None]) == (0.5, None)


def test_grad_spikes_counts_steps_above_three_times_the_median():
    norms = [1.0, 1.2, 0.9, 3.7, 1.1, 3.5, 10.0]
    s = grad_spikes(norms)
    assert s["median"] == pytest.approx(1.2)
    assert s["max"] == 10.0
    assert s["spikes"] == 2  # 3.7 and 10.0 exceed 3 x 1.2; 3.5 does not
    nan = grad_spikes([1.0, float("nan"), 1.0])
    assert nan["spikes"] == 1 and nan["max"] == 1.0  # a non-finite norm is a spike
    assert grad_spikes([]) == {"median": None, "max": None, "spikes": 0}


def _row(step, skipped=False, **kw):
    row = {"phase": "rl", "step": step, "staleness_mean": 1.0, "staleness_max": 1.0, "reward_mean": 0.1 * step, "skipped": float(skipped)}
    if not skipped:
        row.update({"mask_rate": 0.0, "dlogp_mean": 0.01, "dlogp_max": 0.1, "grad_norm": 1.0, "loss_tokens": 100.0})
    row.update(kw)
    return row


def test_run_stats_weights_by_loss_tokens_and_ignores_skipped_steps():
    rows = [_row(1, mask_rate=0.1, dlogp_mean=0.02, loss_tokens=300.0, grad_norm=1.0),
            _row(2, skipped=True),
            _row(3, mask_rate=0.0, dlogp_mean=0.06, dlogp_max=0.9, loss_tokens=100.0, grad_norm=5.0),
            _row(4, grad_norm=1.2)]
    s = run_stats(rows)
    assert s["steps"] == 4 and s["trained_steps"] == 3
    assert s["mask_rate"] == pytest.approx(30.0 / 500.0)
    assert s["dlogp_mean"] == pytest.approx((0.02 * 300 + 0.06 * 100 + 0.01 * 100) / 500)
    assert s["dlogp_max"] == 0.9
    assert s["grad_norm_median"] == 1.2 and s["grad_norm_max"] == 5.0 and s["grad_spikes"] == 1
    assert s["reward_train_first"] == pytest.approx(0.1) and s["reward_train_last"] == pytest.approx(0.4)
    assert s["fresh_steps"] == 0 and s["dlogp_mean_fresh"] is None and s["staleness_max"] == 1.0


def test_run_stats_separates_fresh_batches_where_only_precision_differs():
    rows = [_row(1, staleness_max=0.0, dlogp_mean=0.002, dlogp_max=0.2, loss_tokens=100.0),
            _row(2, staleness_max=0.0, dlogp_mean=0.004, dlogp_max=0.1, loss_tokens=300.0),
            _row(3, staleness_max=2.0, dlogp_mean=0.1, dlogp_max=3.0)]
    s = run_stats(rows)
    assert s["fresh_steps"] == 2 and s["staleness_max"] == 2.0
    assert s["dlogp_mean_fresh"] == pytest.approx((0.2 + 1.2) / 400)
    assert s["dlogp_max_fresh"] == 0.2 and s["dlogp_max"] == 3.0


def test_run_stats_keeps_the_newest_row_of_a_step_logged_twice():
    s = run_stats([_row(1, grad_norm=100.0), _row(2), _row(1, grad_norm=1.0)])
    assert s["steps"] == 2 and s["grad_norm_max"] == 1.0


def test_run_stats_of_a_run_that_never_trained():
    s = run_stats([_row(1, skipped=True), _row(2, skipped=True)])
    assert s["trained_steps"] == 0 and s["mask_rate"] is None and s["grad_spikes"] == 0


def _run(seed, before, after, spikes=0, gmax=2.0):
    return {"seed": seed, "before_greedy": before, "after_greedy": after, "before_sampled": before,
            "after_sampled": None, "mask_rate": 0.01, "dlogp_mean": 0.02, "dlogp_max": 0.5,
            "grad_norm_median": 1.0, "staleness_mean": 1.5, "grad_spikes": spikes, "grad_norm_max": gmax}


def test_aggregate_reports_change_per_seed_with_its_standard_error():
    v = aggregate("kpop", [_run(0, 0.2, 0.5, spikes=1, gmax=4.0), {**_run(1, 0.4, 0.5, spikes=2), "dlogp_max": 0.2}])
    assert v["seeds"] == [0, 1]
    assert v["delta_greedy"] == pytest.approx(0.2)  # +0.3 and +0.1
    assert v["delta_greedy_se"] == pytest.approx(0.1)
    assert v["after_greedy"] == pytest.approx(0.5) and v["after_greedy_se"] == pytest.approx(0.0)
    assert v["delta_sampled"] is None  # no sampled eval after: no change to report
    assert v["grad_spikes"] == 3 and v["grad_norm_max"] == 4.0 and v["dlogp_max"] == 0.5
    lines = table([v])
    assert len(lines) == 3 and lines[2].startswith("| kpop | 0.300 +- 0.100 -> 0.500 +- 0.000 | 0.200 +- 0.100 |")


def test_fmt():
    assert fmt(None) == "-"
    assert fmt(0.5, 0.01) == "0.500 +- 0.010"
    assert fmt(0.0) == "0.000"
    assert fmt(3e-5, digits=4) == "3.00e-05"
