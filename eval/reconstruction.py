"""Yamaguchi & Fukuda 2023's measurements of reconstructed data as functions of t_re.

Real images diffused to t_re and denoised back (``tailforge gen reconstruct``) lose more of the
real image the larger t_re is. For each reconstructed set, against one real reference split:

* Sec. 4.1, Fig. 3b: the Frechet distance in an evaluation classifier's embedding (FID proper is
  this in Inception-v3 features, which cannot be loaded here) with a bootstrap interval
  (:func:`tailforge.eval.fidelity.frechet_distance_interval`), and improved precision and recall
  (Kynkaanniemi et al. 2019; k-NN manifolds of :func:`tailforge.eval.density.manifold_membership`)
  on class-balanced subsets, each with its exact interval. The manifolds depend on the whole
  other set, so the per-item outcomes are not independent and that interval is optimistic.
* Sec. 4.1, Table 1: fake-detection accuracy in the pixel and DCT domains, by logistic regression
  (cross-validated) and by a small CNN (held out), with exact intervals
  (:mod:`tailforge.eval.fidelity`).
* Sec. 4.2, Fig. 1b / 6: the reference's features and each set's projected on the reference's top
  two principal components, one panel per t_re.

The real split the sets were reconstructed from is measured too, as t_re = 0 (a reconstruction at
t_re = 0 copies it): the floor that real data not used as the reference reaches.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tailforge.eval.config import ReconstructionStudyConfig, tre_shard_pair
from tailforge.eval.density import manifold_membership
from tailforge.eval.fidelity import (
    DOMAINS,
    balanced_pair,
    cnn_fake_detection,
    fake_detection_accuracy,
    frechet_distance_interval,
)
from tailforge.eval.results import tag_result
from tailforge.eval.stats import encode_bits, proportion_interval
from tailforge.gen.core.errors import ConfigError

PCA_PNG = "reconstruction_pca.png"
METRICS_PNG = "reconstruction_metrics.png"


def pca_projection(reference: Tensor, *others: Tensor, components: int = 2) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The top principal axes of `reference`'s rows, the fraction of its variance each explains, and
    `reference` and every other set (centred on the reference's mean) projected on them. Each axis
    has its largest-magnitude loading positive (scikit-learn's sign convention)."""
    f = reference.double()
    if len(f) < 2 or f.ndim != 2 or components > min(f.shape):
        raise ConfigError(f"PCA needs at least 2 rows and {components} columns, got shape {tuple(f.shape)}")
    mean = f.mean(0)
    _, singular, vt = torch.linalg.svd(f - mean, full_matrices=False)
    axes = vt[:components]
    axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    explained = (singular**2 / (singular**2).sum())[:components]
    return axes, explained, [(o.double() - mean) @ axes.T for o in (reference, *others)]


def measure_set(reference_images: Tensor, reference_features: Tensor, images: Tensor, features: Tensor,
                config: ReconstructionStudyConfig, device: str = "cpu") -> dict[str, Any]:
    """Every measurement of one set against the reference (images uint8 NCHW, features [N, k])."""
    seed = config.seed
    real_f, fake_f = balanced_pair(reference_features, features, seed, config.pr_k + 1)
    inside, recalled = manifold_membership(real_f, fake_f, config.pr_k)
    detection = {}
    for domain in DOMAINS:
        linear = fake_detection_accuracy(reference_images, images, domain=domain, folds=config.folds, seed=seed)
        cnn = cnn_fake_detection(reference_images, images, domain=domain, holdout=config.holdout,
                                 epochs=config.epochs, seed=seed, device=device)
        detection[domain] = {"logistic_regression": linear, "cnn": cnn}
    return {
        "num_samples": int(len(images)),
        "frechet_distance": frechet_distance_interval(features, reference_features, resamples=config.resamples,
                                                      seed=seed).as_dict(),
        "precision": proportion_interval(inside.numpy()).as_dict(),
        "recall": proportion_interval(recalled.numpy()).as_dict(),
        "precision_recall_items": int(len(real_f)),
        "inside_real_manifold": encode_bits(inside), "real_inside_manifold": encode_bits(recalled),
        "fake_detection": detection,
    }


def _subplots(panels: int, width: float, height: float, *, share: bool = False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False, layout="constrained",
                              sharex=share, sharey=share)


def _save_figure(plt, fig, path: Path) -> None:
    from PIL import Image

    from tailforge.eval.figures import save_png_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    save_png_atomic(Image.open(buf), path)


def pca_figure(points: list[dict[str, Any]], projected: list[Tensor], explained: Tensor, path: Path) -> None:
    """One panel per set: the reference's projected features (grey) under the set's (colour)."""
    plt, fig, axes = _subplots(len(points), 3.1, 3.3, share=True)
    reference = projected[0].numpy()
    for ax, point, xy in zip(axes[0], points, projected[1:]):
        ax.scatter(reference[:, 0], reference[:, 1], s=4, c="0.65", label=f"real reference (n={len(reference)})")
        ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), s=4, c="tab:red", alpha=0.5,
                   label=f"{point['label']} (n={len(xy)})")
        ax.set(title=f"t_re = {point['t_re']:g}", xlabel=f"PC1 ({explained[0]:.0%} of real variance)")
        ax.legend(fontsize=6, loc="upper right")
    axes[0][0].set_ylabel(f"PC2 ({explained[1]:.0%} of real variance)")
    fig.suptitle("evaluation-classifier features on the real reference's top two principal components", fontsize=9)
    _save_figure(plt, fig, path)


def _interval_series(points: list[dict[str, Any]], pick) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = [pick(p) for p in points]
    estimate = np.array([v["estimate"] for v in values])
    return estimate, np.array([v["estimate"] - v["low"] for v in values]), np.array([v["high"] - v["estimate"] for v in values])


def metrics_figure(points: list[dict[str, Any]], path: Path) -> None:
    """FD, precision/recall and fake-detection accuracy against t_re, each with its 95 % interval."""
    plt, fig, axes = _subplots(3, 3.6, 3.2)
    t_re = np.array([p["t_re"] for p in points])
    panels = [
        ("Frechet distance (features)", {"FD": lambda p: p["frechet_distance"]}),
        ("precision / recall", {"precision": lambda p: p["precision"], "recall": lambda p: p["recall"]}),
        ("fake-detection accuracy (0.5 = chance)", {
            f"{name} {domain}": (lambda p, d=domain, m=model: p["fake_detection"][d][m]["interval"])
            for domain in DOMAINS for model, name in (("logistic_regression", "linear"), ("cnn", "CNN"))}),
    ]
    for ax, (title, series) in zip(axes[0], panels):
        for offset, (name, pick) in enumerate(series.items()):
            estimate, below, above = _interval_series(points, pick)
            ax.errorbar(t_re + 0.006 * (offset - len(series) / 2), estimate, yerr=[below, above], marker="o",
                        markersize=3, capsize=2, label=name)
        if title.startswith("fake"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="t_re (fraction of T)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    items = ", ".join(f"t_re {p['t_re']:g}: {p['num_samples']}" for p in points)
    fig.suptitle(f"95 % intervals; samples per set: {items}", fontsize=8)
    _save_figure(plt, fig, path)


def _shard_info(folder: str) -> dict[str, Any]:
    """A shard set's _info.json ({} when it has none)."""
    from tailforge.gen.core.files import read_json

    info = Path(folder) / "_info.json"
    return read_json(info, "shard set info") if info.is_file() else {}


def run_reconstruction_study(config: ReconstructionStudyConfig, out: str | Path, *,
                             device: str | None = None) -> dict[str, Any]:
    """Measure every reconstructed set (and the real split they came from, as t_re = 0) against the
    reference split; write OUT/reconstruction.json, OUT/reconstruction_metrics.png and
    OUT/reconstruction_pca.png."""
    from tailforge.gen.core.device import default_device
    from tailforge.gen.core.files import config_dict, write_json_atomic
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import embed, load_classifier

    started = time.perf_counter()
    device = default_device(device)
    sets, infos = [], []
    for t_re, folder in map(tre_shard_pair, config.shards):
        info = _shard_info(folder)
        recorded = info.get("t_re")
        if t_re is None and recorded is None:
            raise ConfigError(f"shards: {folder} records no t_re (no _info.json t_re); give it as T={folder}")
        if t_re is not None and recorded is not None and abs(float(recorded) - t_re) > 1e-9:
            raise ConfigError(f"shards: {folder} was reconstructed at t_re = {recorded}, not {t_re}")
        sets.append((float(recorded) if t_re is None else t_re, folder))
        infos.append(info)
    if len({t for t, _ in sets}) != len(sets):
        raise ConfigError(f"shards: each t_re once, got {sorted(t for t, _ in sets)}")
    sets.sort()
    sources = {info["source_split"] for info in infos if info.get("source_split")}
    if len(sources) > 1:
        raise ConfigError(f"shards: the sets were reconstructed from different splits ({', '.join(sorted(sources))})")
    source = sources.pop() if sources else "train"
    if source == config.split:
        raise ConfigError(f"split: the sets are reconstructions of the {source!r} split; measure them against "
                          "another split of the real data, not against their own sources")
    classifier, saved = load_classifier(config.classifier, device)
    reference = load_dataset(config.real, config.split)
    loaded = [(0.0, f"real {source} split", load_dataset(config.real, source).images)]
    loaded += [(t_re, folder, load_dataset(f"shards:{folder}", "train").images) for t_re, folder in sets]
    for _, name, images in loaded:
        if images.shape[1:] != reference.images.shape[1:]:
            raise ConfigError(f"{name}: images are {tuple(images.shape[1:])}, {config.real!r} "
                              f"{tuple(reference.images.shape[1:])}")
    reference_features = embed(classifier, reference.images)
    points, features = [], []
    for t_re, name, images in loaded:
        features.append(embed(classifier, images))
        points.append({"t_re": t_re, "label": name if t_re == 0.0 else f"reconstructed (t_re {t_re:g})",
                       "shards": None if t_re == 0.0 else name,
                       **measure_set(reference.images, reference_features, images, features[-1], config, device)})
    _, explained, projected = pca_projection(reference_features, *features)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pca_figure(points, projected, explained, out / PCA_PNG)
    metrics_figure(points, out / METRICS_PNG)
    report = tag_result("reconstruction", {
        "config": {**config_dict(config), "classifier_model": saved.get("model"), "source_split": source},
        "reference": {"dataset": config.real, "split": config.split, "num_images": int(len(reference))},
        "points": points,
        "pca": {"explained_variance_ratio": [float(v) for v in explained], "png": PCA_PNG},
        "metrics_png": METRICS_PNG,
        "seconds": round(time.perf_counter() - started, 2),
    })
    write_json_atomic(out / "reconstruction.json", report)
    return report
