"""The EMM study: its configs, the imbalanced training set, each finding's direction on constructed runs,
the two-sample bootstrap against exact answers, and one tiny study end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tailforge.eval.config import EMMConfig, EMMStudyConfig, parse_class_counts
from tailforge.eval.emm import class_subset
from tailforge.eval.emm_study import class_bits, run_emm_study, study_claims
from tailforge.eval.findings import decide
from tailforge.eval.stats import encode_bits, two_sample_bootstrap
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import load_dataset


def test_two_sample_bootstrap_against_exact_answers():
    constant = two_sample_bootstrap(np.zeros(40), np.ones(25))
    assert (constant.estimate, constant.low, constant.high, constant.items) == (1.0, 1.0, 1.0, 25)
    rng = np.random.default_rng(0)
    a, b = rng.random(4000) < 0.3, rng.random(3000) < 0.5
    interval = two_sample_bootstrap(a, b, resamples=4000)
    assert interval.estimate == pytest.approx(b.mean() - a.mean())
    # the normal approximation of a difference of two independent proportions
    half = 1.96 * math.sqrt(a.mean() * (1 - a.mean()) / len(a) + b.mean() * (1 - b.mean()) / len(b))
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.08)
    assert interval.low < interval.estimate < interval.high
    with pytest.raises(ConfigError, match="two non-empty"):
        two_sample_bootstrap([], [1.0])


def test_class_counts_are_checked():
    assert parse_class_counts(("0:100", "1:5")) == {0: 100, 1: 5}
    for bad in (("0:100", "0:5"), ("x:3",), ("1:1",), ("3",)):
        with pytest.raises(ConfigError, match="class_counts entry"):
            parse_class_counts(bad)
    with pytest.raises(ConfigError, match="sizes=full"):
        EMMConfig(sizes=(50,), class_counts=("0:10", "1:3"))
    with pytest.raises(ConfigError, match="variant_size 30"):
        EMMStudyConfig(variant_size=30)
    with pytest.raises(ConfigError, match="different image counts"):
        EMMStudyConfig(class_counts=("0:10", "1:10"))
    with pytest.raises(ConfigError, match="at least 2"):
        EMMStudyConfig(seeds=1)


def test_class_subset_keeps_the_counts_and_refuses_too_many():
    real = load_dataset("digits", "train")
    subset = class_subset(real, {3: 40, 7: 4}, seed=1)
    assert sorted(subset.labels.tolist()) == [3] * 40 + [7] * 4
    assert set(subset.keys) <= set(real.keys) and len(set(subset.keys)) == 44
    assert class_subset(real, {3: 40, 7: 4}, seed=2).keys != subset.keys  # each seed its own images
    with pytest.raises(ConfigError, match="has 1.. training images of class 3"):
        class_subset(real, {3: 10_000}, seed=0)


def _run(bits, classes=(0, 1, 2)):
    return {"snapshots": [{"memorization_ratio": float(np.mean(bits)), "replicate": encode_bits(bits)},
                          {"memorization_ratio": 0.0, "replicate": encode_bits([False] * len(bits))}],
            "sampled_classes": list(classes)}


def test_each_finding_follows_its_paper_direction_on_constructed_runs():
    config = EMMStudyConfig(sizes=(10, 100), variant_size=10, class_counts=("4:90", "6:9"))
    claims = study_claims(config)
    many, none = [True] * 1200, [False] * 1200
    imbalance = [label == 6 for label in np.asarray([4, 6])[np.arange(1200) % 2]]  # only class 6 copied
    paper_side = {"n10": _run(many), "n100": _run(none), "dummy": _run(none), "random": _run(many),
                  "unique": _run(many), "imbalance": _run(imbalance, classes=(4, 6))}
    half = [True] * 600 + [False] * 600
    paper_side["n10"] = paper_side["random"] = _run(half)  # the control memorizes half: unique can rise above it
    verdicts = [row["verdict"] for row in decide(paper_side, claims)]
    assert verdicts == ["reproduced"] * 5
    other_side = {"n10": _run(half), "n100": _run(many), "dummy": _run(many), "random": _run(many),
                  "unique": _run(none), "imbalance": _run([not b for b in imbalance], classes=(4, 6))}
    assert [row["verdict"] for row in decide(other_side, claims)] == ["contradicted"] * 5
    # the highest snapshot counts, and the imbalanced run's samples split by their class
    assert class_bits(paper_side["imbalance"], 6).all() and not class_bits(paper_side["imbalance"], 4).any()


@pytest.mark.slow
def test_tiny_study_end_to_end_and_cached(tmp_path):
    config = EMMStudyConfig(seeds=2, sizes=(6, 12), variant_size=6, dummy=6, class_counts=("0:8", "1:3"), epochs=4,
                            batch_size=16, num_samples=12, sampling_steps=2)
    study = run_emm_study(config, tmp_path, in_process=True, progress=False)
    assert [row["seeds"] for row in study["findings"]] == [2] * 5
    assert all(row["verdict"] in ("reproduced", "contradicted", "inconclusive") for row in study["findings"])
    assert set(study["ratios"]) == {"n6", "n12", "dummy", "random", "unique", "imbalance"}
    assert study["ratios"]["imbalance"]["num_train"] == 11
    # every run trained for the same epochs; each seed drew its own subsets
    runs = {name: json.loads((tmp_path / f"seed-{seed}" / folder / "runs" / run / "result.json").read_text())
            for seed in (0, 1) for name, folder, run in [((seed, "n12"), "sizes", "n12"),
                                                          ((seed, "dummy"), "dummy", "n6")]}
    # steps = ceil(epochs * N / batch): each run's epochs are 4, up to one batch more
    assert all(4 <= r["training_epochs"] < 4 + 16 / r["num_train_images"] + 0.01 for r in runs.values())
    assert json.loads((tmp_path / "emm-study.json").read_text())["findings"] == study["findings"]
    stamp = (tmp_path / "seed-1" / "imbalance" / "runs" / "nfull" / "result.json").stat().st_mtime_ns
    again = run_emm_study(config, tmp_path, in_process=True, progress=False)
    assert again["findings"] == study["findings"]
    assert (tmp_path / "seed-1" / "imbalance" / "runs" / "nfull" / "result.json").stat().st_mtime_ns == stamp
