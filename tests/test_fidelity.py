"""Frechet distance against closed forms; fake detection on sets that are and are not distinguishable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from tailforge.eval.fidelity import dct_features, fake_detection_accuracy, frechet_distance, frechet_distance_features
from tailforge.gen.data.datasets import load_dataset


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
