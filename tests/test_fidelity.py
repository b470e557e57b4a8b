"""Frechet distance against closed forms; fake detection (linear and CNN) on sets that are and are not
distinguishable; the PCA projection of `tailforge eval reconstruction` against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from tailforge.eval.config import ReconstructionStudyConfig
from tailforge.eval.fidelity import (
    cnn_fake_detection,
    dct_features,
    fake_detection_accuracy,
    frechet_distance,
    frechet_distance_features,
    frechet_distance_interval,
)
from tailforge.eval.reconstruction import pca_projection, run_reconstruction_study
from tailforge.eval.report import reconstruction_section
from tailforge.eval.results import RESULT_VERSIONS
from tailforge.eval.stats import decode_bits
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import ShardRecord, ShardSpec, encode_sample
from tailforge.gen.data.shards.write import save_record, write_manifest, write_shard
from tailforge.gen.models.classifiers import create_classifier, save_classifier


def test_frechet_distance_of_diagonal_gaussians():
    # for diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 4 + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_from_samples_approaches_the_population_value():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # population: ||(1,0,0)||^2 + 3 * (1 - 2)^2 = 4
    assert frechet_distance_features(a, b) == pytest.approx(4.0, abs=0.1)


def test_dct_of_a_constant_image_is_only_the_dc_term():
    features = dct_features(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8))
    assert features[0, 0] == pytest.approx(np.log(8.0))  # orthonormal DC of ones(8x8) is 8
    assert (features[0, 1:] < -20).all()


def test_fake_detection_chance_for_real_vs_real_and_high_for_noise():
    data = load_dataset("digits", "train").images
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    half_a, half_b = data[order[:400]], data[order[400:800]]
    for domain in ("pixel", "dct"):
        same = fake_detection_accuracy(half_a, half_b, domain=domain)
        assert abs(same["accuracy"] - 0.5) < 0.1, (domain, same)
    noise = torch.randint(0, 256, (400, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for domain in ("pixel", "dct"):
        assert fake_detection_accuracy(half_a, noise, domain=domain)["accuracy"] > 0.95


# --------------------------------------------------------------------------------------------
# intervals, the CNN detector and the PCA projection of `tailforge eval reconstruction`


@pytest.fixture(scope="module")
def digit_halves():
    data = load_dataset("digits", "train").images
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data[order[:400]], data[order[400:800]]


def test_frechet_distance_interval_of_identical_sets_is_zero():
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    interval = frechet_distance_interval(features, features, resamples=100)
    assert interval.estimate == pytest.approx(0.0, abs=1e-9)
    assert interval.low == 0.0 and interval.low <= interval.estimate <= interval.high
    assert interval.items == 600 and interval.seeds == 1


def test_frechet_distance_interval_covers_the_population_value():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2000, 3, generator=gen, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    interval = frechet_distance_interval(a, b, resamples=150)
    assert interval.low < 4.0 < interval.high  # ||(1,0,0)||^2 + 3 (1 - 2)^2
    assert interval.high - interval.low < 1.2


def test_linear_detector_scores_every_image_once_with_an_exact_interval(digit_halves):
    real, fake = digit_halves
    result = fake_detection_accuracy(real, fake, domain="pixel")
    correct = decode_bits(result["correct"])
    assert len(correct) == 800 and result["accuracy"] == pytest.approx(correct.mean())
    assert result["interval"]["items"] == 800 and result["interval"]["low"] < 0.5 < result["interval"]["high"]


@pytest.mark.parametrize("domain", ["pixel", "dct"])
def test_cnn_detector_at_chance_on_two_halves_of_one_set(digit_halves, domain):
    result = cnn_fake_detection(*digit_halves, domain=domain, epochs=15)
    assert result["test_items"] == 240 and result["train_items"] == 560  # 30 % of 400 of each kind held out
    assert result["interval"]["low"] < 0.5 < result["interval"]["high"], result["interval"]
    assert result["accuracy"] == pytest.approx(decode_bits(result["correct"]).mean())


@pytest.mark.parametrize("domain", ["pixel", "dct"])
def test_cnn_detector_separates_a_constant_shift(digit_halves, domain):
    real, other = digit_halves
    shifted = (other.int() + 40).clamp(0, 255).to(torch.uint8)
    result = cnn_fake_detection(real, shifted, domain=domain, epochs=15)
    assert result["interval"]["low"] > 0.9, result["interval"]


def test_cnn_detector_is_deterministic_for_a_seed(digit_halves):
    real, fake = digit_halves
    first = cnn_fake_detection(real[:100], fake[:100], epochs=2, seed=3)
    assert first == cnn_fake_detection(real[:100], fake[:100], epochs=2, seed=3)


def test_cnn_detector_refuses_bad_input(digit_halves):
    real, fake = digit_halves
    with pytest.raises(ConfigError, match="holdout"):
        cnn_fake_detection(real, fake, holdout=1.0)
    with pytest.raises(ConfigError, match="at least 4 px"):
        cnn_fake_detection(real[:, :, :2, :2], fake[:, :, :2, :2])
    with pytest.raises(ConfigError, match="domain"):
        cnn_fake_detection(real, fake, domain="fourier")


def test_pca_projection_matches_scikit_learn():
    from sklearn.decomposition import PCA

    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 6, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1],
                                                                                       dtype=torch.float64)
    other = torch.randn(50, 6, generator=gen, dtype=torch.float64) + 1.0
    axes, explained, (ref_xy, other_xy) = pca_projection(reference, other)
    pca = PCA(n_components=2).fit(reference.numpy())
    signs = np.sign((axes.numpy() * pca.components_).sum(1))  # scikit-learn's sign convention changed in 1.5
    np.testing.assert_allclose(axes.numpy(), pca.components_ * signs[:, None], atol=1e-10)
    np.testing.assert_allclose(explained.numpy(), pca.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(ref_xy.numpy(), pca.transform(reference.numpy()) * signs, atol=1e-9)
    np.testing.assert_allclose(other_xy.numpy(), pca.transform(other.numpy()) * signs, atol=1e-9)


def _write_reconstructed_set(root, images, labels, t_re):
    spec = ShardSpec(job="r", index=0, start=0, count=len(labels), seed=0)
    samples = [encode_sample(f"r-{i:09d}", images[i].permute(1, 2, 0).numpy(), int(labels[i]), {"t_re": t_re})
               for i in range(len(labels))]
    sha, size = write_shard(root, spec, samples)
    record = ShardRecord(name=spec.name, index=0, start=0, count=spec.count, sha256=sha, size_bytes=size,
                         seconds=0.0, model_evals=0, worker="test")
    save_record(root, record)
    write_manifest(root, [record], extra={"num_classes": 10, "t_re": t_re, "source_split": "train"})


@pytest.fixture(scope="module")
def reconstruction_inputs(tmp_path_factory):
    """A random-weight evaluation classifier and two stand-in reconstructed sets of 150 training digits:
    near copies (t_re 0.3) and a constant shift (t_re 1.0), which a detector must find."""
    torch.manual_seed(0)
    classifier = tmp_path_factory.mktemp("classifier")
    save_classifier(classifier, create_classifier("tinycnn", num_classes=10, in_chans=1).eval(),
                    {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    train = load_dataset("digits?n=150", "train")
    sets = {}
    for t_re, images in ((0.3, train.images), (1.0, (train.images.int() + 60).clamp(0, 255).to(torch.uint8))):
        sets[t_re] = tmp_path_factory.mktemp(f"t_re_{t_re}")
        _write_reconstructed_set(sets[t_re], images, train.labels, t_re)
    return classifier, sets


def test_reconstruction_study_end_to_end(tmp_path, reconstruction_inputs):
    from tailforge.eval.report import Section

    classifier, sets = reconstruction_inputs
    config = ReconstructionStudyConfig(real="digits?n=150", classifier=str(classifier), epochs=10, resamples=30,
                                       shards=(f"0.3={sets[0.3]}", str(sets[1.0])))  # bare: t_re from _info.json
    report = run_reconstruction_study(config, tmp_path, device="cpu")
    saved = json.loads((tmp_path / "reconstruction.json").read_text())
    assert saved["kind"] == "reconstruction" and saved["version"] == RESULT_VERSIONS["reconstruction"]
    assert [p["t_re"] for p in saved["points"]] == [0.0, 0.3, 1.0] and saved["points"][0]["shards"] is None
    assert saved["reference"] == {"dataset": "digits?n=150", "split": "test", "num_images": 360}
    for point in report["points"]:
        assert point["num_samples"] == 150 and point["precision_recall_items"] == 150
        for name in ("frechet_distance", "precision", "recall"):
            assert point[name]["low"] <= point[name]["estimate"] <= point[name]["high"]
    shifted = report["points"][2]["fake_detection"]["pixel"]["cnn"]
    assert shifted["interval"]["low"] > 0.9 and shifted["test_items"] == 90  # 30 % of 150 of each kind
    for png in ("reconstruction_pca.png", "reconstruction_metrics.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
    section = Section("reconstruction", "t_re")
    reconstruction_section(section, [(tmp_path / "reconstruction.json", saved)])
    assert len(section.tables[0].rows) == 3 and len(section.figures) == 2


def test_reconstruction_study_refuses_bad_sets(tmp_path, reconstruction_inputs):
    classifier, sets = reconstruction_inputs
    with pytest.raises(ConfigError, match="reconstructions of the 'train' split"):
        run_reconstruction_study(ReconstructionStudyConfig(real="digits", classifier=str(classifier), split="train",
                                                           shards=(f"0.3={sets[0.3]}",)), tmp_path)
    with pytest.raises(ConfigError, match="reconstructed at t_re = 0.3, not 0.5"):
        run_reconstruction_study(ReconstructionStudyConfig(real="digits", classifier=str(classifier),
                                                           shards=(f"0.5={sets[0.3]}",)), tmp_path)
    with pytest.raises(ConfigError, match="T=SHARD_DIR"):
        ReconstructionStudyConfig(real="digits", classifier=str(classifier), shards=("half=dir",))
    assert not (tmp_path / "reconstruction.json").exists()
