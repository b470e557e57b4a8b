"""The statistics behind every finding: intervals against exact answers, and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tailforge.eval.stats import Interval, bias_shifted_interval, bootstrap, paired_bootstrap, t_interval, verdict
from tailforge.gen.core.errors import ConfigError


def test_t_interval_is_the_textbook_interval_of_a_normal_mean():
    values = [0.91, 0.93, 0.92, 0.95, 0.90]
    got = t_interval(values, items=10_000)
    mean, sem = np.mean(values), np.std(values, ddof=1) / math.sqrt(5)
    half = scipy_stats.t.ppf(0.975, 4) * sem  # 2.776 * sem
    assert got.estimate == pytest.approx(mean)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half))
    assert got.seeds == 5 and got.items == 10_000
    # scipy's own interval of the mean agrees
    assert (got.low, got.high) == pytest.approx(scipy_stats.t.interval(0.95, 4, loc=mean, scale=sem))


def test_one_seed_gives_an_infinite_interval_and_no_verdict():
    one = t_interval([0.02])
    assert one.low == -math.inf and one.high == math.inf
    assert verdict(one, "greater") == "inconclusive"


def test_bootstrap_of_two_items_matches_the_enumerated_distribution():
    # resamples of (0, 1): means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % quantiles are 0 and 1, and about half of the draws are 0.5
    got = bootstrap([0.0, 1.0], resamples=20_000, seed=3)
    assert (got.low, got.high) == (0.0, 1.0) and got.estimate == 0.5


def test_paired_bootstrap_of_a_constant_shift_is_exact():
    rng = np.random.default_rng(0)
    a = rng.random(50)
    got = paired_bootstrap(a, a + 0.25)
    assert got.estimate == pytest.approx(0.25)
    assert got.low == pytest.approx(0.25) and got.high == pytest.approx(0.25)
    same = paired_bootstrap(a, a)
    assert (same.low, same.high) == (0.0, 0.0)


def test_pairing_narrows_the_interval_of_correlated_systems():
    # two classifiers that disagree on 4 of 400 images: unpaired, their accuracies' intervals
    # overlap widely; paired, the difference is pinned to the 4 images
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.8).astype(float)
    b = a.copy()
    flips = np.flatnonzero(a == 0)[:4]
    b[flips] = 1.0
    got = paired_bootstrap(a, b, resamples=4000)
    assert got.estimate == pytest.approx(4 / 400)
    assert got.low > 0  # each resample keeps the flips' sign: b is never worse than a
    single = bootstrap(a)
    assert got.high - got.low < (single.high - single.low) / 3


def test_bootstrap_interval_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        sample = rng.normal(1.0, 2.0, size=60)
        iv = bootstrap(sample, resamples=1000, seed=trial)
        covered += iv.low <= 1.0 <= iv.high
    assert 0.88 <= covered / 200 <= 0.99


@pytest.mark.parametrize("low, high, direction, min_effect, expected", [
    (0.01, 0.05, "greater", 0.0, "reproduced"),
    (-0.05, -0.01, "greater", 0.0, "contradicted"),
    (-0.01, 0.05, "greater", 0.0, "inconclusive"),
    (0.01, 0.05, "greater", 0.02, "inconclusive"),  # a real but too small effect
    (-0.05, -0.01, "less", 0.0, "reproduced"),
    (0.01, 0.05, "less", 0.0, "contradicted"),
    (-0.02, 0.004, "not_greater", 0.005, "reproduced"),  # any gain is below half a point
    (0.01, 0.03, "not_greater", 0.005, "contradicted"),
    (-0.01, 0.01, "not_greater", 0.005, "inconclusive"),
])
def test_verdict_rule(low, high, direction, min_effect, expected):
    interval = Interval((low + high) / 2, low, high, 0.95, "exact", 100, 3)
    assert verdict(interval, direction, min_effect) == expected


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="direction"):
        verdict(Interval(0, 0, 0, 0.95, "exact", 1, 1), "bigger")
    with pytest.raises(ConfigError, match="equal-length"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ConfigError, match="level"):
        t_interval([1, 2], level=95)


def test_auroc_difference_agrees_with_scikit_learn_and_pins_identical_detectors():
    from sklearn.metrics import roc_auc_score

    from tailforge.eval.stats import auroc_difference

    rng = np.random.default_rng(2)
    id_a, ood_a = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    id_b, ood_b = id_a + 0.5, ood_a  # b separates better
    got = auroc_difference(id_a, ood_a, id_b, ood_b, resamples=500)
    y = np.r_[np.ones(300), np.zeros(200)]
    expected = roc_auc_score(y, np.r_[id_b, ood_b]) - roc_auc_score(y, np.r_[id_a, ood_a])
    assert got.estimate == pytest.approx(expected) and 0 < got.low < expected < got.high
    same = auroc_difference(id_a, ood_a, id_a, ood_a, resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and same.items == 500
    with pytest.raises(ConfigError, match="same ID and OOD items"):
        auroc_difference(id_a, ood_a, id_b[:10], ood_b)


def test_proportion_interval_is_clopper_pearson_and_does_not_collapse_at_zero():
    from tailforge.eval.stats import proportion_interval

    zero = proportion_interval(np.zeros(500))
    assert zero.estimate == 0 and zero.low == 0 and zero.high == pytest.approx(1 - 0.025 ** (1 / 500))
    some = proportion_interval(np.r_[np.ones(30), np.zeros(70)])
    ci = scipy_stats.binomtest(30, 100).proportion_ci(method="exact")
    assert (some.low, some.high) == pytest.approx((ci.low, ci.high)) and some.items == 100
    with pytest.raises(ConfigError, match="0/1"):
        proportion_interval([0.5, 1.0])


def test_bias_shifted_interval_recentres_biased_draws_on_the_estimate():
    # draws of a statistic biased up by 1 around an estimate of 2 (as resampled distances are): the plain
    # percentile interval [2.5, 3.5] misses the estimate, the shifted one is [1.5, 2.5]; a floor cuts it
    draws = 3.0 + np.linspace(-0.5, 0.5, 1001)
    got = bias_shifted_interval(2.0, draws, level=0.95, method="m", items=10)
    tail = 0.475  # the 2.5 % and 97.5 % quantiles of a uniform grid on [-0.5, 0.5]
    assert (got.low, got.high) == pytest.approx((2.0 - tail, 2.0 + tail))
    floored = bias_shifted_interval(0.1, draws, level=0.95, method="m", items=10, floor=0.0)
    assert floored.low == 0.0 and floored.high == pytest.approx(0.1 + tail)
