"""Uncertainty for every comparison, and the rule that turns it into a verdict.

Two sources of uncertainty, two intervals (both 95 % by default):

* within one run, the test items are a sample: :func:`paired_bootstrap` resamples the items
  (test images, or generated samples) with replacement and recomputes the difference of a metric
  between two systems evaluated on the *same* items, so the item-to-item correlation of the two
  systems is kept (Efron & Tibshirani 1993, ch. 13; the percentile interval);
* across runs, the seeds are a sample: :func:`t_interval` is the Student-t interval of the mean of
  one figure per seed, mean +- t_{1 - a/2, n - 1} s / sqrt(n).

:func:`verdict` decides a paper's finding from such an interval: "reproduced" when the interval
lies wholly on the paper's side, "contradicted" when it lies wholly on the other side,
"inconclusive" otherwise. Point estimates alone never decide.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

from tailforge.gen.core.errors import ConfigError

VERDICTS = ("reproduced", "contradicted", "inconclusive")
#: what a paper claims about a difference d = (its system) - (its baseline)
DIRECTIONS = ("greater", "less", "not_greater")


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval and what it rests on."""

    estimate: float  # the point estimate (the metric's difference on all items, or the mean over seeds)
    low: float  # lower end of the interval
    high: float  # upper end of the interval
    level: float  # confidence level, e.g. 0.95
    method: str  # "paired bootstrap (B resamples)", "bootstrap", "t over seeds", "exact"
    items: int  # test items (or samples) each estimate is computed on
    seeds: int  # independent runs behind the estimate (1 for a bootstrap within one run)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def encode_bits(flags: Sequence[bool] | np.ndarray) -> str:
    """Per-item 0/1 outcomes (correct, inside a manifold, a replicate) as a string of '0' and '1':
    what result JSONs store so that every comparison can be bootstrapped over the same items later."""
    return "".join("1" if f else "0" for f in np.asarray(flags, dtype=bool).reshape(-1))


def decode_bits(text: str) -> np.ndarray:
    """The float64 0/1 array of :func:`encode_bits`'s string."""
    if set(text) - {"0", "1"}:
        raise ConfigError("per-item outcomes must be a string of 0 and 1")
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"confidence level must be in (0, 1), got {level}")


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def bootstrap_indices(num_items: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_items] item indices drawn with replacement from a seeded generator."""
    return np.random.default_rng(seed).integers(0, num_items, size=(resamples, num_items))


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     statistic: Callable[[np.ndarray], np.ndarray] = _mean, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of statistic(b) - statistic(a) over the same items, e.g. per-image correctness of a
    baseline classifier (a) and of the one a paper says is better (b).

    ``statistic`` maps [..., items] arrays to [...] (the mean by default, so on 0/1 correctness it
    is the accuracy difference). Each resample draws item indices once and applies them to both
    arrays: that is what makes it paired."""
    _check_level(level)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ConfigError(f"a paired bootstrap needs two equal-length 1-d arrays, got shapes {a.shape} and {b.shape}")
    index = bootstrap_indices(len(a), resamples, seed)
    diffs = statistic(b[index]) - statistic(a[index])
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(statistic(b) - statistic(a)), float(low), float(high), level,
                    f"paired bootstrap ({resamples} resamples)", len(a), 1)


def two_sample_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                         resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of mean(b) - mean(a) for items of two independent samples (e.g. the generated images of
    two separately trained models): each side is resampled on its own, keeping its size (the percentile
    interval; Efron & Tibshirani 1993, ch. 8)."""
    _check_level(level)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or not len(a) or not len(b):
        raise ConfigError(f"a two-sample bootstrap needs two non-empty 1-d arrays, got shapes {a.shape} and {b.shape}")
    diffs = b[bootstrap_indices(len(b), resamples, seed + 1)].mean(axis=1) - \
        a[bootstrap_indices(len(a), resamples, seed)].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(b.mean() - a.mean()), float(low), float(high), level,
                    f"two-sample bootstrap ({resamples} resamples)", min(len(a), len(b)), 1)


def bias_shifted_interval(estimate: float, draws: np.ndarray, *, level: float, method: str, items: int,
                          floor: float | None = None) -> Interval:
    """The percentile interval of bootstrap `draws` moved by their bias (their mean minus the
    full-sample `estimate`). For a statistic such as the Frechet distance, resampling with
    replacement duplicates items and shifts every draw up, so the plain percentile interval can lie
    wholly above the estimate; the shifted one keeps the draws' spread around it. ``floor`` cuts
    the ends (0 for a distance)."""
    _check_level(level)
    draws = np.asarray(draws, dtype=np.float64)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail]) - (draws.mean() - estimate)
    if floor is not None:
        low, high = max(floor, low), max(floor, high)
    return Interval(float(estimate), float(low), float(high), level, method, items, 1)


def bootstrap(values: Sequence[float] | np.ndarray, *, statistic: Callable[[np.ndarray], np.ndarray] = _mean,
              resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of one statistic over items (e.g. an accuracy)."""
    _check_level(level)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ConfigError(f"a bootstrap needs a non-empty 1-d array, got shape {values.shape}")
    draws = statistic(values[bootstrap_indices(len(values), resamples, seed)])
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(statistic(values)), float(low), float(high), level, f"bootstrap ({resamples} resamples)",
                    len(values), 1)


def proportion_interval(flags: Sequence[bool] | np.ndarray, *, level: float = 0.95) -> Interval:
    """Exact (Clopper-Pearson) interval of a proportion of 0/1 outcomes, e.g. a memorization ratio.
    Unlike the percentile bootstrap it does not collapse to a point when none (or all) of the items
    are hits: 0 of 500 gives [0, 0.0074]."""
    _check_level(level)
    values = np.asarray(flags, dtype=np.float64).reshape(-1)
    if len(values) == 0 or not np.isin(values, (0.0, 1.0)).all():
        raise ConfigError("a proportion interval needs a non-empty array of 0/1 outcomes")
    hits, n = int(values.sum()), len(values)
    ci = scipy_stats.binomtest(hits, n).proportion_ci(confidence_level=level, method="exact")
    return Interval(hits / n, float(ci.low), float(ci.high), level, "exact binomial (Clopper-Pearson)", n, 1)


def auroc_difference(id_a: Sequence[float], ood_a: Sequence[float], id_b: Sequence[float], ood_b: Sequence[float],
                     *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of AUROC(b) - AUROC(a) for two detectors scoring the same ID and OOD items (higher =
    more in-distribution): ID and OOD items are resampled separately (each group keeps its size), the
    same indices for both detectors. AUROC by the Mann-Whitney rank form, ties counted half."""
    _check_level(level)
    arrays = [np.asarray(v, dtype=np.float64) for v in (id_a, ood_a, id_b, ood_b)]
    if arrays[0].shape != arrays[2].shape or arrays[1].shape != arrays[3].shape or not all(len(v) for v in arrays):
        raise ConfigError("an AUROC comparison needs both detectors' scores on the same ID and OOD items")
    n_id, n_ood = len(arrays[0]), len(arrays[1])
    take_id, take_ood = bootstrap_indices(n_id, resamples, seed), bootstrap_indices(n_ood, resamples, seed + 1)

    def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
        ranks = scipy_stats.rankdata(np.concatenate([id_scores, ood_scores], axis=-1), axis=-1)
        return (ranks[..., :n_id].sum(axis=-1) - n_id * (n_id + 1) / 2) / (n_id * n_ood)

    a = auroc(arrays[0][take_id], arrays[1][take_ood])
    b = auroc(arrays[2][take_id], arrays[3][take_ood])
    tail = (1 - level) / 2
    low, high = np.quantile(b - a, [tail, 1 - tail])
    estimate = auroc(arrays[2], arrays[3]) - auroc(arrays[0], arrays[1])
    return Interval(float(estimate), float(low), float(high), level,
                    f"stratified paired bootstrap ({resamples} resamples)", n_id + n_ood, 1)


def t_interval(per_seed: Sequence[float], *, level: float = 0.95, items: int = 0) -> Interval:
    """Student-t interval of the mean of one figure per seed (e.g. an accuracy difference per seed).

    With one seed there is no spread to estimate: the interval is infinite, and every verdict
    drawn from it is "inconclusive"."""
    _check_level(level)
    values = np.asarray(per_seed, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ConfigError(f"a t-interval needs one value per seed, got shape {values.shape}")
    mean = float(values.mean())
    if len(values) == 1:
        return Interval(mean, -math.inf, math.inf, level, "t over seeds", items, 1)
    half = float(scipy_stats.t.ppf(1 - (1 - level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return Interval(mean, mean - half, mean + half, level, "t over seeds", items, len(values))


def seeds_interval(per_seed: Sequence[Interval], *, level: float = 0.95) -> Interval:
    """The interval of a difference measured once per seed on the same test items.

    Two sources of noise: the seeds (training randomness), estimated by the Student t-interval of
    the per-seed estimates (:func:`t_interval`), and the test items, which every seed shares, so
    their noise does not average out over seeds; it is each seed's own interval (a bootstrap over
    the items). The half-widths add in quadrature, half = sqrt(t_half^2 + mean(item_half)^2), so
    seeds that agree exactly (a t-interval of width 0) still carry the test set's uncertainty."""
    if not per_seed:
        raise ConfigError("combining seeds needs at least one seed's interval")
    seeds = t_interval([i.estimate for i in per_seed], level=level, items=min(i.items for i in per_seed))
    if len(per_seed) == 1:
        return seeds
    item_half = float(np.mean([(i.high - i.low) / 2 for i in per_seed]))
    half = math.hypot((seeds.high - seeds.low) / 2, item_half)
    return dataclasses.replace(seeds, low=seeds.estimate - half, high=seeds.estimate + half,
                               method="t over seeds, with the test items' bootstrap in quadrature")


def verdict(interval: Interval, direction: str, min_effect: float = 0.0) -> str:
    """The rule every finding is decided by.

    ``direction`` is what the paper claims about d = (its system) - (its baseline):

    * "greater": d > min_effect. Reproduced when the whole interval lies above min_effect,
      contradicted when it lies below 0;
    * "less": d < -min_effect, the mirror image;
    * "not_greater": no gain of min_effect or more (e.g. "training on reconstructions does not
      raise accuracy"). Reproduced when the whole interval lies below min_effect, contradicted
      when it lies above min_effect.

    Anything else is "inconclusive": the data cannot tell."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
    if min_effect < 0 or not math.isfinite(min_effect):
        raise ConfigError(f"min_effect must be a finite number >= 0, got {min_effect}")
    low, high = interval.low, interval.high
    if direction == "less":
        low, high = -high, -low
        direction = "greater"
    if direction == "greater":
        if low > min_effect:
            return "reproduced"
        if high < 0:
            return "contradicted"
        return "inconclusive"
    if high < min_effect:
        return "reproduced"
    if low > min_effect:
        return "contradicted"
    return "inconclusive"
