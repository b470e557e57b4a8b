"""Fidelity of a synthetic set against real data (Yamaguchi & Fukuda 2023 Section 4.1).

* Frechet distance (Heusel et al. 2017) between Gaussians fitted to real and synthetic features,

      FD = ||mu_r - mu_s||^2 + tr(S_r + S_s - 2 (S_r S_s)^(1/2)),

  in the embedding of a named evaluation classifier (no Inception weights can be loaded here;
  FID proper is this quantity in Inception-v3 pool features). The FD between the real training
  and real test splits is reported beside it as the floor that two real samples reach.
* Fake-detection accuracy (Yamaguchi & Fukuda 2023 Table 1, after Frank et al. 2020): the held-out accuracy of a
  classifier trained to tell real from synthetic images, in the pixel domain and in the frequency
  domain (log-magnitude of the orthonormal 2-D DCT-II of every channel). 50 % means the two sets
  are indistinguishable to it. Two detectors: a linear model (scikit-learn logistic regression on
  standardised inputs; Frank et al. include such a linear baseline), scored by stratified k-fold
  cross-validation on class-balanced data, and a small CNN (:class:`FakeDetectorCNN`; Yamaguchi &
  Fukuda cite CNN detectors) trained on a class-balanced split and scored on the held-out rest.
  Both report their accuracy with the exact (Clopper-Pearson) interval over the items scored.
* Precision and recall (Kynkaanniemi et al. 2019) belong to ``tailforge eval density``
  (:func:`tailforge.eval.density.precision_recall`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tailforge.eval.config import FidelityConfig
from tailforge.eval.results import tag_result
from tailforge.eval.stats import Interval, bias_shifted_interval, bootstrap_indices, encode_bits, proportion_interval
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.images import uint8_to_float


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


def frechet_distance_interval(a: Tensor, b: Tensor, *, resamples: int = 500, level: float = 0.95,
                              seed: int = 0) -> Interval:
    """The Frechet distance of two feature sets with a bootstrap interval: each resample draws both
    sets' rows with replacement (independently: the two sets are separate samples) and recomputes
    the distance. Two resamples of even the same set differ, so the resampled distances sit above
    the full-set one by a bias (their mean minus it; about 0.3 for two copies of 500 16-d rows); the
    percentile interval is shifted down by that bias, so it keeps the resamples' spread around the
    estimate, and cut at 0, below which no distance lies."""
    if not 0 < level < 1:
        raise ConfigError(f"confidence level must be in (0, 1), got {level}")
    fa, fb = a.double(), b.double()
    take_a, take_b = bootstrap_indices(len(fa), resamples, seed), bootstrap_indices(len(fb), resamples, seed + 1)
    draws = np.array([frechet_distance_features(fa[torch.from_numpy(i)], fb[torch.from_numpy(j)])
                      for i, j in zip(take_a, take_b)])
    estimate = max(0.0, frechet_distance_features(fa, fb))  # 0 up to round-off for identical sets
    return bias_shifted_interval(estimate, draws, level=level, items=len(fa) + len(fb), floor=0.0,
                                 method=f"bias-shifted bootstrap over both sets ({resamples} resamples)")


def dct_features(images: Tensor) -> np.ndarray:
    """Frank et al. 2020: log-magnitude of the orthonormal 2-D DCT-II of every channel, flattened."""
    from scipy.fft import dctn

    x = images.double().numpy() / 255.0 if images.dtype == torch.uint8 else images.double().numpy()
    return np.log(np.abs(dctn(x, type=2, norm="ortho", axes=(-2, -1))) + 1e-12).reshape(len(x), -1)


def pixel_features(images: Tensor) -> np.ndarray:
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    return x.reshape(len(x), -1).numpy()


DOMAINS = ("pixel", "dct")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ConfigError(f"domain must be pixel or dct, got {domain!r}")


def balanced_pair(real: Tensor, fake: Tensor, seed: int, minimum: int) -> tuple[Tensor, Tensor]:
    """min(len(real), len(fake)) rows of each, chosen with `seed` (a detector on unequal classes
    could beat 50 % by predicting the larger one)."""
    n = min(len(real), len(fake))
    if n < minimum:
        raise ConfigError(f"fake detection needs at least {minimum} images of each kind, got {len(real)} real, "
                          f"{len(fake)} fake")
    rng = np.random.default_rng(seed)
    return real[torch.from_numpy(rng.permutation(len(real))[:n])], fake[torch.from_numpy(rng.permutation(len(fake))[:n])]


def fake_detection_accuracy(real: Tensor, fake: Tensor, *, domain: str = "pixel", folds: int = 5,
                            seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy of a linear real-vs-synthetic classifier (Yamaguchi & Fukuda 2023 Table 1) on
    class-balanced data: min(len(real), len(fake)) images of each, chosen with `seed`. Every image is
    scored once, by the fold model that did not train on it: "interval" is the exact interval of that
    accuracy, "correct" the per-image outcomes (real images first)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_domain(domain)
    real, fake = balanced_pair(real, fake, seed, folds)
    n = len(real)
    featurize = pixel_features if domain == "pixel" else dct_features
    x = np.concatenate([featurize(real), featurize(fake)])
    y = np.r_[np.zeros(n), np.ones(n)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    correct = cross_val_predict(model, x, y, cv=splits) == y
    per_fold = [correct[test].mean() for _, test in splits]
    return {"accuracy": float(correct.mean()), "std": float(np.std(per_fold)), "per_class_count": int(n),
            "folds": folds, "interval": proportion_interval(correct).as_dict(), "correct": encode_bits(correct)}


class FakeDetectorCNN(torch.nn.Module):
    """A three-conv binary real-vs-synthetic classifier for small images (after the simple CNN
    detectors Frank et al. 2020 train in the pixel and DCT domains): 3x3 convolutions of 16, 32, 32
    channels with ReLU, a 2x2 max-pool after the first two, average-pooled to 2x2 so that where a
    pattern lies (in the DCT domain: which frequencies) still counts, and one linear logit."""

    def __init__(self, in_chans: int):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.logit = nn.Linear(32 * 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(self.features(x).flatten(1))[:, 0]


def detector_inputs(images: Tensor, domain: str) -> Tensor:
    """Float NCHW inputs of the CNN detector: pixels in [-1, 1], or the per-channel DCT
    log-magnitudes of :func:`dct_features` in the image's layout (standardised by the caller)."""
    _check_domain(domain)
    if domain == "pixel":
        return uint8_to_float(images) if images.dtype == torch.uint8 else images.float()
    return torch.from_numpy(dct_features(images)).float().view(images.shape)


def cnn_fake_detection(real: Tensor, fake: Tensor, *, domain: str = "pixel", holdout: float = 0.3,
                       epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                       device: str = "cpu") -> dict[str, Any]:
    """Held-out accuracy of :class:`FakeDetectorCNN` telling `real` (label 0) from `fake` (label 1)
    images (uint8 NCHW, at least 4 px): min(len(real), len(fake)) of each (chosen with `seed`), a
    `holdout` fraction of each kind kept out of training and scored once. Adam at `lr` for
    `epochs`, binary cross-entropy; the weights, the split and the batch order all come from `seed`.
    Returns the accuracy with its exact interval, the items it rests on and the per-item outcomes
    (held-out real images first)."""
    _check_domain(domain)
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout}")
    if min(real.shape[-2:]) < 4:
        raise ConfigError(f"the CNN detector needs images of at least 4 px, got {tuple(real.shape[-2:])}")
    real, fake = balanced_pair(real, fake, seed, 2)
    n = len(real)
    held = min(n - 1, max(1, round(holdout * n)))
    x = torch.cat([detector_inputs(real, domain), detector_inputs(fake, domain)])
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    gen = torch.Generator().manual_seed(seed)
    test = torch.cat([torch.randperm(n, generator=gen)[:held], n + torch.randperm(n, generator=gen)[:held]])
    in_train = torch.ones(2 * n, dtype=torch.bool)
    in_train[test] = False
    train = in_train.nonzero()[:, 0]
    if domain == "dct":  # log-magnitudes span tens of nats per coefficient: standardise on the training split
        x = (x - x[train].mean(0)) / x[train].std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FakeDetectorCNN(x.shape[1]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    threads = torch.get_num_threads()
    # layers this small gain nothing from intra-op threads, and on a shared CPU they cost 10-30x
    torch.set_num_threads(1)
    try:
        net.train()
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=gen)]
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                logits = net(x[batch].to(device))
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
        with torch.no_grad():
            correct = ((net(x[test].to(device)).cpu() > 0).float() == y[test]).numpy()
    finally:
        torch.set_num_threads(threads)
    interval = proportion_interval(correct)
    return {"accuracy": interval.estimate, "interval": interval.as_dict(), "test_items": int(len(test)),
            "train_items": int(len(train)), "per_class_count": int(n), "epochs": epochs,
            "correct": encode_bits(correct)}


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
                                for domain in DOMAINS}
    return report


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
