"""EMM interpolation on synthetic ratios, the training sets EMM builds, and one tiny study end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tailforge.eval.config import EMMConfig
from tailforge.eval.emm import (
    estimate_emm,
    parse_sizes,
    run_emm,
    snapshot_steps,
    subset_spec,
    training_set,
    training_steps,
)
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import load_dataset


def test_emm_interpolates_between_the_bracketing_sizes():
    # ratios >= 0.9 up to N = 50, below from N = 100: EMM = 50 + (0.95 - 0.9) * 50 / (0.95 - 0.6)
    result = estimate_emm([100, 25, 200, 50], [0.6, 1.0, 0.1, 0.95], epsilon=0.1)
    assert result["bracketed"] and result["monotone"]
    assert (result["lower_size"], result["upper_size"]) == (50, 100)
    assert result["emm"] == pytest.approx(50 + 0.05 * 50 / 0.35)


def test_emm_uses_the_largest_size_still_above_threshold():
    # not monotone (Hypothesis 1 violated at N = 20): the last size above 0.9 is 40
    result = estimate_emm([10, 20, 40, 80], [1.0, 0.5, 0.92, 0.0])
    assert not result["monotone"] and (result["lower_size"], result["upper_size"]) == (40, 80)
    assert result["emm"] == pytest.approx(40 + 0.02 * 40 / 0.92)


def test_emm_bounds_when_not_bracketed():
    below = estimate_emm([100, 200], [0.5, 0.1])
    assert below["emm"] is None and not below["bracketed"] and below["upper_size"] == 100
    above = estimate_emm([10, 20], [1.0, 0.95])
    assert above["emm"] is None and above["lower_size"] == 20
    exact = estimate_emm([10, 20], [0.9, 0.5])  # exactly 1 - eps counts as memorizing
    assert exact["emm"] == pytest.approx(10.0)


def test_subset_spec_and_sizes():
    assert subset_spec("digits", 100, 3) == "digits?n=100&subset_seed=3"
    assert subset_spec("gm?size=8", 0, 0) == "gm?size=8"
    assert subset_spec("gm?size=8", 20, 0) == "gm?size=8&n=20&subset_seed=0"
    with pytest.raises(ConfigError):
        subset_spec("digits?n=5", 10, 0)
    assert parse_sizes("25, 50,full") == (25, 50, 0)
    small = load_dataset(subset_spec("digits", 50, 0))
    large = load_dataset(subset_spec("digits", 100, 0))
    assert set(small.keys) <= set(large.keys)  # nested subsets (Hypothesis 1 compares D1 subset of D2)


def test_training_sets_for_dummy_random_and_unique_labels(tmp_path):
    real = load_dataset("digits?n=30&subset_seed=0")
    spec, model_classes, sample_classes = training_set(EMMConfig(dummy=20), real, tmp_path / "dummy")
    data = load_dataset(spec)
    assert (model_classes, sample_classes) == (11, sorted(set(real.labels.tolist()))) and len(data) == 50
    assert (data.labels == 10).sum() == 20 and data.info.class_names[-1] == "gm-dummy"
    assert torch.equal(data.images[:30], real.images)  # the real images are all there, unchanged

    spec, model_classes, _ = training_set(EMMConfig(labels="random", random_classes=3), real, tmp_path / "random")
    data = load_dataset(spec)
    assert model_classes == 3 and set(data.labels.tolist()) <= {0, 1, 2}

    spec, model_classes, _ = training_set(EMMConfig(labels="unique"), real, tmp_path / "unique")
    data = load_dataset(spec)
    assert model_classes == 30 and data.labels.tolist() == list(range(30))

    assert training_set(EMMConfig(labels="none"), real, tmp_path)[1:] == (None, [])
    # a subset missing classes: samples are drawn only for the classes it has
    few = load_dataset("digits?n=5&subset_seed=0")
    assert training_set(EMMConfig(), few, tmp_path)[1:] == (10, sorted(set(few.labels.tolist())))
    assert len(set(few.labels.tolist())) < 10


def test_config_validation():
    with pytest.raises(ConfigError):
        EMMConfig(sizes=(1,))
    with pytest.raises(ConfigError):
        EMMConfig(labels="random", dummy=5)
    with pytest.raises(ConfigError):
        EMMConfig(epsilon=1.5)


@pytest.mark.parametrize("dummy", [0, 300])
def test_every_size_trains_for_the_same_epochs(dummy):
    """Gu et al. 2023 App. B: the same epochs for every size, so each image (real or dummy) is drawn
    equally often; with budget=steps, the same steps instead. With dummy images, a real image is
    seen as often as without them: the exposure-matched control of dummy injection."""
    config = EMMConfig(epochs=40, batch_size=128, dummy=dummy)
    sizes = (10, 50, 100, 400, 1437)
    steps = [training_steps(config, n + dummy) for n in sizes]
    epochs = [s * config.batch_size / (n + dummy) for s, n in zip(steps, sizes)]
    assert all(40 <= e < 40 + config.batch_size / (n + dummy) for e, n in zip(epochs, sizes))
    plain = [training_steps(dataclasses.replace(config, dummy=0), n) * 128 / n for n in sizes]
    assert all(abs(a - b) < 128 / n for a, b, n in zip(epochs, plain, sizes))  # same exposure per real image
    assert {training_steps(dataclasses.replace(config, budget="steps", steps=700), n + dummy) for n in sizes} == {700}
    assert snapshot_steps(10, 4) == [3, 5, 8, 10] and snapshot_steps(2, 4) == [1, 2]


def test_tiny_study_in_process_and_resumes(tmp_path):
    config = EMMConfig(sizes=(12, 24), epochs=2, snapshots=2, batch_size=16, num_samples=12, sampling_steps=2)
    report = run_emm(config, tmp_path, in_process=True, progress=False)
    assert [p["size"] for p in report["points"]] == [12, 24]
    assert all(0.0 <= p["memorization_ratio"] <= p["max_memorization_ratio"] <= 1.0 for p in report["points"])
    # fixed epochs: the larger set trains for more steps, so each image is drawn as often
    assert [p["training_steps"] for p in report["points"]] == [2, 3]
    run = json.loads((tmp_path / "runs" / "n24" / "result.json").read_text())
    assert [s["step"] for s in run["snapshots"]] == [2, 3] and run["max_memorization_ratio"] == max(
        s["memorization_ratio"] for s in run["snapshots"])
    assert report["emm_final"]["threshold"] == report["emm"]["threshold"]
    saved = json.loads((tmp_path / "emm.json").read_text())
    assert saved["emm"] == report["emm"] and saved["config"]["sizes"] == [12, 24]
    result = tmp_path / "runs" / "n12" / "result.json"
    stamp = result.stat().st_mtime_ns
    run_emm(config, tmp_path, in_process=True, progress=False)  # finished sizes are reused, not retrained
    assert result.stat().st_mtime_ns == stamp
    smaller = dataclasses.replace(config, sizes=(12,))  # a study over fewer sizes reuses the shared run
    assert run_emm(smaller, tmp_path, in_process=True, progress=False)["points"][0]["size"] == 12
    assert result.stat().st_mtime_ns == stamp
    assert (tmp_path / "runs" / "n24" / "nearest_pairs.png").is_file()
