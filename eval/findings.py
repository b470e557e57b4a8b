"""The papers' findings a run can check, each decided from an interval, never from two point estimates.

Every finding is a difference d between two systems measured on the same items (test images, or
generated samples that share their seeds), with the direction the paper claims and the smallest
effect that counts (:func:`tailforge.eval.stats.verdict`). Its interval is a paired bootstrap over
those items (:func:`tailforge.eval.stats.paired_bootstrap`); the results it reads keep each item's
outcome for exactly this ("correct" bits of accuracy and corruption results, "per_sample" values of
density results, "replicate" bits of memorization results). Over several runs that differ only in
their seed (`tailforge study`), :func:`combine_seeds` replaces it with a t-interval of the runs' differences.

The claims, by paper:

* Sehwag et al. 2022 (Sec. 4.2, Fig. 4): alpha/beta-guided samples lie in lower-density regions
  than baseline samples from the same seeds (higher hardness, AvgkNN, LOF in an independent
  classifier's embedding), stay faithful to their class, keep their precision, and help a
  classifier more than baseline samples do.
* Yamaguchi & Fukuda 2023 (Fig. 5, Table 2): a classifier is more confident (lower output entropy,
  Eq. 4) on reconstructions of test images than on the images; training on reconstructions does
  not raise test accuracy.
* Sastry et al. 2023: DiffAug keeps clean accuracy and raises accuracy under corruptions;
  DiffAug-Ensemble adds to that robustness; DiffAug-trained classifiers detect OOD inputs better
  (AUROC of ASH, MSP, ReAct and Scale, every OOD set pooled), with DiffAug-Ensemble as well.
* Sastry et al. 2023 (denoise-augmented classifiers): guidance classifiers fed x_t and its denoised
  estimate are more accurate on noisy images than noisy classifiers fed x_t alone, and their guidance
  gives better samples (here: higher precision of the low-density samples they guide).
* Gu et al. 2023 / Yoon et al. 2023: a model trained on the full training set generates new
  images, not copies (memorization ratio near 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from tailforge.eval.stats import (
    Interval,
    auroc_difference,
    decode_bits,
    paired_bootstrap,
    proportion_interval,
    seeds_interval,
    verdict,
)
from tailforge.gen.core.errors import ConfigError

#: the fields of an Interval, as a finding's row stores them
_INTERVAL_FIELDS = tuple(field.name for field in dataclasses.fields(Interval))

#: the effect below which a classifier comparison on accuracy does not count (half a point)
ACCURACY_MARGIN = 0.005


@dataclasses.dataclass(frozen=True)
class Claim:
    """One finding as a paper states it, and what this run measures for it."""

    paper: str  # author and year
    finding: str  # the claim in words
    difference: str  # what d is, in words
    direction: str  # what the paper claims about d (eval.stats.DIRECTIONS)
    min_effect: float  # the smallest |d| that counts (eval.stats.verdict)
    measure: Callable[[dict[str, Any]], Interval]  # results -> the interval of d


def _median(values: np.ndarray) -> np.ndarray:
    return np.median(values, axis=-1)


def _shift(interval: Interval, by: float) -> Interval:
    """The interval of d - by (a claim against a fixed threshold)."""
    return dataclasses.replace(interval, estimate=interval.estimate - by, low=interval.low - by,
                               high=interval.high - by)


def correct(results: dict[str, Any], name: str) -> np.ndarray:
    """Per-test-image correctness of classifier `name` (clean test split)."""
    return decode_bits(results["accuracy"][name]["correct"])


def corrupted_correct(results: dict[str, Any], name: str) -> np.ndarray:
    """Per-item correctness over every (corruption, severity, test image) that the mean corruption
    accuracy averages: the CIFAR-10-C benchmark corruptions that change the images (held-out ones excluded)."""
    rows = results["corruptions"][name]["corruptions"]
    return np.concatenate([decode_bits(cell["correct"]) for corruption in sorted(rows)
                           if rows[corruption]["benchmark"] and rows[corruption]["effective"]
                           for cell in rows[corruption]["severities"]])


def per_sample(results: dict[str, Any], shard_set: str, metric: str) -> np.ndarray:
    values = results["density"][shard_set]["samples"]["per_sample"][metric]
    return decode_bits(values) if isinstance(values, str) else np.asarray(values, dtype=np.float64)


def _ood_auroc(plain: str, better: str, score: str) -> Callable[[dict[str, Any]], Interval]:
    """AUROC(better) - AUROC(plain) of one OOD score, the ID test images against every OOD set pooled."""
    def measure(results: dict[str, Any]) -> Interval:
        sides = []
        for name in (plain, better):
            per_item = results["ood_by_classifier"][name]["per_item_scores"]
            sides += [per_item["id"][score], np.concatenate([v[score] for k, v in sorted(per_item.items()) if k != "id"])]
        return auroc_difference(*sides)

    return measure


#: the OOD scores Sastry et al. 2023 report DiffAug's detection gains with
DIFFAUG_OOD_SCORES = ("ash", "msp", "react", "scale")


def guidance_correct(results: dict[str, Any], name: str, levels: list[str]) -> np.ndarray:
    """Per (noise level, held-out image) correctness of guidance classifier `name` (its guidance.json's
    classifier_test_correct), the levels in the order given."""
    correct = results["guidance_classifiers"][name]["classifier_test_correct"]
    if sorted(correct) != sorted(levels):
        raise ConfigError(f"guidance classifier {name!r} was measured at noise levels {sorted(correct)}, not {sorted(levels)}")
    return np.concatenate([decode_bits(correct[level]) for level in levels])


def _guidance_accuracy(plain: str, better: str) -> Callable[[dict[str, Any]], Interval]:
    """Held-out accuracy of guidance classifier `better` minus `plain`, pooled over every noise level: both were
    measured on the same noisy images (train/guidance.py draws the noise from the seed and the level)."""
    def measure(results: dict[str, Any]) -> Interval:
        levels = sorted(results["guidance_classifiers"][plain]["classifier_test_correct"], key=float)
        return paired_bootstrap(guidance_correct(results, plain, levels), guidance_correct(results, better, levels))

    return measure


def _density(metric: str) -> Callable[[dict[str, Any]], Interval]:
    return lambda r: paired_bootstrap(per_sample(r, "baseline", metric), per_sample(r, "lowdensity", metric),
                                      statistic=_median)


CLAIMS: tuple[Claim, ...] = (
    *(Claim("Sehwag et al. 2022", f"guided samples lie in lower-density regions than baseline samples from the same "
            f"seeds: higher {label} in an independent classifier's embedding",
            f"median {label}, guided - baseline (sample i of both shares its seed)", "greater", 0.0, _density(metric))
      for metric, label in (("hardness", "hardness"), ("avg_knn", "AvgkNN"), ("lof", "LOF"))),
    Claim("Sehwag et al. 2022", "guided samples stay faithful: an independent classifier assigns most (>= 60 %) to "
          "their class", "class agreement of guided samples - 0.6", "greater", 0.0,
          lambda r: _shift(proportion_interval(per_sample(r, "lowdensity", "faithful")), 0.6)),
    Claim("Sehwag et al. 2022", "guided samples keep their precision (at least half the baseline's)",
          "precision guided - 0.5 x precision baseline", "greater", 0.0,
          lambda r: paired_bootstrap(0.5 * per_sample(r, "baseline", "inside_real_manifold"),
                                     per_sample(r, "lowdensity", "inside_real_manifold"))),
    Claim("Sehwag et al. 2022", "adding low-density samples to real data helps the classifier more than adding "
          "baseline samples", "test accuracy, real+lowdensity - real+baseline", "greater", 0.0,
          lambda r: paired_bootstrap(correct(r, "real+baseline"), correct(r, "real+lowdensity"))),
    Claim("Yamaguchi & Fukuda 2023", "a real-data classifier is more confident on reconstructions of test images "
          "than on the images themselves (Fig. 5)", "mean output entropy, reconstructions - real test images",
          "less", 0.0, lambda r: paired_bootstrap(np.asarray(r["entropy"]["test"]["real"]),
                                                  np.asarray(r["entropy"]["test"]["reconstructed"]))),
    Claim("Yamaguchi & Fukuda 2023", "training on reconstructed data does not raise test accuracy over real data "
          "(Table 2)", "test accuracy, real+reconstructed - real", "not_greater", ACCURACY_MARGIN,
          lambda r: paired_bootstrap(correct(r, "real"), correct(r, "real+reconstructed"))),
    Claim("Sastry et al. 2023", "DiffAug keeps clean accuracy (loses less than 1 point)",
          "test accuracy, real - real+diffaug (the loss)", "not_greater", 0.01,
          lambda r: paired_bootstrap(correct(r, "real+diffaug"), correct(r, "real"))),
    Claim("Sastry et al. 2023", "DiffAug raises accuracy on corrupted images",
          "corruption accuracy, real+diffaug - real", "greater", 0.0,
          lambda r: paired_bootstrap(corrupted_correct(r, "real"), corrupted_correct(r, "real+diffaug"))),
    Claim("Sastry et al. 2023", "DiffAug-Ensemble adds to DiffAug's robustness",
          "corruption accuracy, with - without DiffAug-Ensemble (DiffAug-trained classifier)", "greater", 0.0,
          lambda r: paired_bootstrap(corrupted_correct(r, "real+diffaug"),
                                     corrupted_correct(r, "real+diffaug + DiffAug-Ensemble"))),
    *(Claim("Sastry et al. 2023", f"DiffAug training improves OOD detection ({score.upper()} AUROC)",
            f"AUROC of {score}, real+diffaug - real (ID test images vs every OOD set)", "greater", 0.0,
            _ood_auroc("real", "real+diffaug", score)) for score in DIFFAUG_OOD_SCORES),
    Claim("Sastry et al. 2023", "DiffAug-Ensemble improves a DiffAug-trained classifier's OOD detection (MSP AUROC)",
          "AUROC of msp, with - without DiffAug-Ensemble (DiffAug-trained classifier)", "greater", 0.0,
          _ood_auroc("real+diffaug", "real+diffaug + DiffAug-Ensemble", "msp")),
    Claim("Sastry et al. 2023", "denoise-augmented guidance classifiers (x_t and its denoised estimate) are more "
          "accurate than noisy classifiers (x_t only)", "held-out accuracy over every noise level, DA-classifier - "
          "noisy classifier (the same noisy images)", "greater", 0.0, _guidance_accuracy("noisy", "da")),
    Claim("Sastry et al. 2023", "guidance by DA-classifiers gives better samples than by noisy classifiers: higher "
          "precision", "precision, DA-guided - noisy-guided low-density samples (sample i of both shares its seed)",
          "greater", 0.0, lambda r: paired_bootstrap(per_sample(r, "lowdensity-noisy", "inside_real_manifold"),
                                                     per_sample(r, "lowdensity-da", "inside_real_manifold"))),
    Claim("Gu et al. 2023; Yoon et al. 2023", "a model trained on the full training set generates new images, not "
          "copies (memorization ratio below 5 %)", "memorization ratio - 0.05", "less", 0.0,
          lambda r: _shift(proportion_interval(decode_bits(r["memorization"]["replicate"])), 0.05)),
)


def decide(results: dict[str, Any], claims: tuple[Claim, ...] = CLAIMS) -> list[dict[str, Any]]:
    """One row per claim: the interval of its difference and the verdict the rule gives."""
    rows = []
    for claim in claims:
        interval = claim.measure(results)
        rows.append({"paper": claim.paper, "finding": claim.finding, "difference": claim.difference,
                     "direction": claim.direction, "min_effect": claim.min_effect, **interval.as_dict(),
                     "verdict": verdict(interval, claim.direction, claim.min_effect)})
    return rows


def combine_seeds(per_seed: Sequence[list[dict[str, Any]]], *, level: float = 0.95) -> list[dict[str, Any]]:
    """One row per claim over several runs that differ only in their seed (each a list of :func:`decide`'s
    rows): the claim's measured difference in each run, their interval across the runs
    (:func:`tailforge.eval.stats.seeds_interval`: the t-interval over runs with the shared test items'
    noise added) and the verdict the same rule gives for it; each
    run's own row (its interval over the items) is kept under "per_seed", in run order."""
    if not per_seed:
        raise ConfigError("combining seeds needs the findings of at least one run")
    keyed = [{(r["paper"], r["finding"]): r for r in rows} for rows in per_seed]
    combined = []
    for key, first in keyed[0].items():
        missing = [i for i, rows in enumerate(keyed) if key not in rows]
        if missing:
            raise ConfigError(f"finding {key[1]!r} ({key[0]}) is missing from run(s) {missing}: the runs checked "
                              "different claims")
        rows = [rows[key] for rows in keyed]
        interval = seeds_interval([Interval(**{k: r[k] for k in _INTERVAL_FIELDS}) for r in rows], level=level)
        combined.append({**{k: first[k] for k in ("paper", "finding", "difference", "direction", "min_effect")},
                         **interval.as_dict(), "verdict": verdict(interval, first["direction"], first["min_effect"]),
                         "per_seed": rows})
    return combined
