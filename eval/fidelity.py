"""Fidelity of a synthetic set against real data (Yamaguchi & Fukuda 2023 Section 4.1).

* Frechet distance (Heusel et al. 2017) between Gaussians fitted to real and synthetic features,

      FD = ||mu_r - mu_s||^2 + tr(S_r + S_s - 2 (S_r S_s)^(1/2)),

  in the embedding of a named evaluation classifier (no Inception weights can be loaded here;
  FID proper is this quantity in Inception-v3 pool features). The FD between the real training
  and real test splits is reported beside it as the floor that two real samples reach.
* Fake-detection accuracy (Yamaguchi & Fukuda 2023 Table 1, after Frank et al. 2020): the held-out accuracy of a
  classifier trained to tell real from synthetic images, in the pixel domain and in the frequency
  domain (log-magnitude of the orthonormal 2-D DCT-II of every channel). 50 % means the two sets
  are indistinguishable to it. The detector is a linear model (scikit-learn logistic regression on
  standardised inputs; Frank et al. include such a linear baseline), scored by stratified k-fold
  cross-validation on class-balanced data.
* Precision and recall (Kynkaanniemi et al. 2019) belong to ``tailforge eval density``
  (:func:`tailforge.eval.density.precision_recall`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tailforge.eval.results import tag_result
from tailforge.gen.core.checks import NonNegativeInt, PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError


def gaussian_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of feature rows, in float64."""
    f = features.double().numpy()
    if len(f) < 2:
        raise ConfigError(f"the Frechet distance needs at least 2 samples per set, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real
    and non-negative for covariance matrices (S1 S2 is similar to S1^(1/2) S2 S1^(1/2)); this
    avoids the complex round-off of a general matrix square root (scipy's sqrtm)."""
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_features(a: Tensor, b: Tensor) -> float:
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))


def dct_features(images: Tensor) -> np.ndarray:
    """Frank et al. 2020: log-magnitude of the orthonormal 2-D DCT-II of every channel, flattened."""
    from scipy.fft import dctn

    x = images.double().numpy() / 255.0 if images.dtype == torch.uint8 else images.double().numpy()
    return np.log(np.abs(dctn(x, type=2, norm="ortho", axes=(-2, -1))) + 1e-12).reshape(len(x), -1)


def pixel_features(images: Tensor) -> np.ndarray:
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    return x.reshape(len(x), -1).numpy()


def fake_detection_accuracy(real: Tensor, fake: Tensor, *, domain: str = "pixel", folds: int = 5,
                            seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of a linear real-vs-synthetic classifier (Yamaguchi & Fukuda 2023 Table 1) on
    class-balanced data: min(len(real), len(fake)) images of each, chosen with `seed`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if domain not in ("pixel", "dct"):
        raise ConfigError(f"domain must be pixel or dct, got {domain!r}")
    n = min(len(real), len(fake))
    if n < folds:
        raise ConfigError(f"fake detection needs at least {folds} images of each kind, got {len(real)} real, {len(fake)} fake")
    rng = np.random.default_rng(seed)
    real = real[torch.from_numpy(rng.permutation(len(real))[:n])]
    fake = fake[torch.from_numpy(rng.permutation(len(fake))[:n])]
    featurize = pixel_features if domain == "pixel" else dct_features
    x = np.concatenate([featurize(real), featurize(fake)])
    y = np.r_[np.zeros(n), np.ones(n)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return {"accuracy": float(scores.mean()), "std": float(scores.std()), "per_class_count": int(n), "folds": folds}


def fidelity_report(classifier: torch.nn.Module, samples: Tensor, train: Tensor, test: Tensor | None, *,
                    folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Frechet distance in `classifier`'s embedding (samples vs real training images; real test vs
    real training as the floor) and fake-detection accuracy in the pixel and DCT domains."""
    from tailforge.gen.models.classifiers import embed

    train_f = embed(classifier, train)
    report = tag_result("fidelity", {"frechet_distance": frechet_distance_features(embed(classifier, samples), train_f),
                                     "num_samples": int(len(samples)), "num_train": int(len(train))})
    if test is not None:
        report["frechet_distance_real_test_vs_train"] = frechet_distance_features(embed(classifier, test), train_f)
    report["fake_detection"] = {domain: fake_detection_accuracy(train, samples, domain=domain, folds=folds, seed=seed)
                                for domain in ("pixel", "dct")}
    return report


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    """`tailforge eval fidelity`; copied into fidelity.json."""

    shards: str  # synthetic shard set
    dataset: str  # real dataset spec: its training split is the reference, its test split the FD floor
    classifier: str  # evaluation classifier folder: the feature space of the Frechet distance
    folds: PositiveInt = 5  # cross-validation folds of the fake detector
    seed: NonNegativeInt = 0  # class balancing and fold seed

    def __post_init__(self):
        check_fields(self)


def run_fidelity(config: FidelityConfig, out: str | Path, *, device: str | None = None) -> dict[str, Any]:
    """Measure the shard set against the real data, write OUT/fidelity.json."""
    from tailforge.gen.core.device import default_device
    from tailforge.gen.core.errors import DatasetError
    from tailforge.gen.core.files import config_dict, write_json_atomic
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import load_classifier

    started = time.perf_counter()
    classifier, saved = load_classifier(config.classifier, device or default_device())
    samples = load_dataset(f"shards:{config.shards}", "train")
    train = load_dataset(config.dataset, "train")
    try:
        test = load_dataset(config.dataset, "test").images
    except DatasetError:
        test = None
    if samples.images.shape[1:] != train.images.shape[1:]:
        raise ConfigError(f"samples are {tuple(samples.images.shape[1:])}, {config.dataset!r} images "
                          f"{tuple(train.images.shape[1:])}")
    report = fidelity_report(classifier, samples.images, train.images, test, folds=config.folds, seed=config.seed)
    report["config"] = {**config_dict(config), "classifier_model": saved.get("model"),
                        "detector": "logistic regression on standardised inputs"}
    report["seconds"] = round(time.perf_counter() - started, 2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "fidelity.json", report)
    return report
