"""Density and fidelity of a sample set in the feature space of an evaluation classifier.

Sehwag et al. 2022, Sec. 4.2: hardness (Eq. 3), AvgkNN (mean distance to the k = 5
nearest real neighbours) and LOF (Breunig et al. 2000; scikit-learn's LocalOutlierFactor with
novelty=True), all measured with a network that did *not* guide the sampler; Sec. 4.1 / Fig. 4b:
precision (and recall) of k-NN manifolds (Kynkaanniemi et al. 2019, k = 3), computed in chunks so
no N x M distance matrix is ever held.

The functions are pure functions of feature tensors ([N, k], float) so other evaluations import
them; :func:`evaluate_density` is the `tailforge eval density` command's computation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import LocalOutlierFactor
from torch import Tensor

from tailforge.eval.config import DensityConfig
from tailforge.eval.neighbors import distance_blocks, knn
from tailforge.eval.results import tag_result
from tailforge.eval.stats import encode_bits
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict, file_sha256
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.methods.lowdensity import ClassGaussians, fit_class_gaussians, hardness
from tailforge.gen.models.classifiers import CLASSIFIER_WEIGHTS, embed, load_classifier, predict_logits

#: fields of a sample's json that say how it was generated (copied into the report)
PROVENANCE = ("kind", "sampler", "steps", "eta", "alpha", "beta", "tau", "guidance_loss", "guidance_input",
              "guidance_hash", "model_hash", "seed")


def summarize(values: Tensor) -> dict[str, float]:
    """Median, mean and quartiles of a 1-d tensor (the paper compares distributions, Fig. 7)."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": round(q[1], 5), "mean": round(float(v.mean()), 5), "q25": round(q[0], 5), "q75": round(q[2], 5)}


def crossfit_hardness(features: Tensor, labels: Tensor, num_classes: int, *, folds: int = 5,
                      shrinkage: str = "ledoit_wolf", seed: int = 0) -> Tensor:
    """Out-of-fold hardness of a labelled reference set: each fold is scored by class Gaussians fitted
    on the other folds. A new sample is scored by Gaussians that never saw it, so percentiles of
    this (not of in-sample hardness, which the fitted covariance makes optimistically low) are
    the thresholds it can be compared with."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    out = torch.empty(len(labels), dtype=features.dtype)
    for fold in order.chunk(folds):
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[fold] = False
        g = fit_class_gaussians(features[rest], labels[rest], num_classes, shrinkage)
        out[fold] = hardness(features[fold], labels[fold], g).detach()
    return out


def avg_knn_distance(features: Tensor, reference: Tensor, k: int = 5, *, exclude_self: bool = False) -> Tensor:
    """AvgkNN: mean Euclidean distance from each row of `features` to its k nearest rows of
    `reference` (Sehwag et al. 2022, Sec. 4.2, k = 5). ``exclude_self`` when `features` is `reference`."""
    return knn(features.double(), reference.double(), k, exclude_self=exclude_self).distances.mean(1)


def lof_scores(features: Tensor, reference: Tensor, n_neighbors: int = 20) -> Tensor:
    """Local outlier factor of each row of `features` relative to `reference` (Breunig et al. 2000;
    scikit-learn, novelty=True, its default 20 neighbours). About 1 inside a cluster; higher means
    lower density than the neighbours have."""
    lof = LocalOutlierFactor(n_neighbors=n_neighbors, novelty=True).fit(reference.double().numpy())
    return torch.from_numpy(-lof.score_samples(features.double().numpy()))


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance of each row to its k-th nearest other row (the radius of its k-NN ball)."""
    if len(features) <= k:
        raise ConfigError(f"k-NN radii need more than k = {k} points, got {len(features)}")
    f = features.double()
    return knn(f, f, k, exclude_self=True, query_chunk=chunk_size).distances[:, k - 1]


def manifold_coverage(queries: Tensor, points: Tensor, radii: Tensor, chunk_size: int = 1024) -> Tensor:
    """Per query: whether it lies inside at least one k-NN ball of `points` (radii from knn_radii)."""
    r = radii.double()
    return torch.cat([(d <= r).any(dim=1) for d in distance_blocks(queries, points, chunk_size)])


def manifold_membership(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per fake sample: inside the real k-NN manifold (union of balls reaching each real sample's
    k-th neighbour); per real sample: inside the fake one (Kynkaanniemi et al. 2019)."""
    return (manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size),
            manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of fake
    samples inside the real manifold, recall the fraction of real samples inside the fake one."""
    precision, recall = manifold_membership(real, fake, k, chunk_size)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


@dataclasses.dataclass
class RealReference:
    """The real data a sample set is measured against, in one evaluation feature space."""

    train: Tensor  # [N, k] training-split features: kNN / LOF / manifold reference
    train_labels: Tensor  # [N]
    gaussians: ClassGaussians  # class Gaussians of the training features
    train_hardness: Tensor  # [N] out-of-fold hardness of the training split (thresholds)
    num_classes: int


def real_reference(train_features: Tensor, train_labels: Tensor, num_classes: int, config: DensityConfig,
                   ) -> RealReference:
    return RealReference(train=train_features, train_labels=train_labels,
                         gaussians=fit_class_gaussians(train_features, train_labels, num_classes, config.shrinkage),
                         train_hardness=crossfit_hardness(train_features, train_labels, num_classes,
                                                          folds=config.folds, shrinkage=config.shrinkage),
                         num_classes=num_classes)


def density_metrics(features: Tensor, labels: Tensor, reference: RealReference, config: DensityConfig,
                    ) -> dict[str, Tensor]:
    """Per-sample hardness, AvgkNN and LOF of a labelled feature set against the real reference."""
    return {"hardness": hardness(features, labels, reference.gaussians).detach(),
            "avg_knn": avg_knn_distance(features, reference.train, config.k),
            "lof": lof_scores(features, reference.train, config.lof_neighbors)}


def density_summary(features: Tensor, labels: Tensor, logits: Tensor, reference: RealReference,
                    config: DensityConfig) -> dict[str, Any]:
    """Summaries of density_metrics, manifold precision/recall against the real training features,
    and the fraction the evaluation classifier assigns to the labelled class; "per_sample" keeps
    each sample's values (in shard order) so two sample sets can be compared sample by sample."""
    per_sample = density_metrics(features, labels, reference, config)
    faithful = logits.argmax(1) == labels
    inside, recalled = manifold_membership(reference.train, features, config.pr_k)
    return {"num": len(labels), **{name: summarize(v) for name, v in per_sample.items()},
            "precision": float(inside.double().mean()), "recall": float(recalled.double().mean()),
            "accuracy": float(faithful.double().mean()),
            "per_sample": {**{name: [round(float(x), 5) for x in v] for name, v in per_sample.items()},
                           "faithful": encode_bits(faithful), "inside_real_manifold": encode_bits(inside)}}


def read_shard_set(root: str | Path) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Images (uint8 NCHW), labels and per-sample json of a shard set, in shard order."""
    images, labels, metas = [], [], []
    for sample in iter_samples(root):
        images.append(torch.from_numpy(sample["image"]))
        labels.append(sample["label"])
        metas.append(sample["meta"])
    if not images:
        raise ConfigError(f"shard set {root} holds no samples")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), metas


def provenance(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The generation settings the samples share (a field that varies is listed with all its values)."""
    out = {}
    for field in PROVENANCE:
        values = sorted({json_value for m in metas if (json_value := m.get(field)) is not None}, key=str)
        if values:
            out[field] = values[0] if len(values) == 1 else values
    return out


def check_independent(classifier_dir: str | Path, metas: list[dict[str, Any]]) -> None:
    """Refuse to measure guided samples with the network that guided them (DESIGN.md: the
    measurement would only restate the objective)."""
    sha = file_sha256(Path(classifier_dir) / CLASSIFIER_WEIGHTS)
    if any(m.get("guidance_classifier_sha256") == sha for m in metas):
        raise ConfigError(f"{classifier_dir} is the classifier that guided these samples; evaluate them with an "
                          "independent classifier (e.g. `tailforge train classifier --model tinycnn_wide`)")


def evaluate_density(shards: str | Path, dataset: str, classifier_dir: str | Path, config: DensityConfig,
                     ) -> dict[str, Any]:
    """The `tailforge eval density` report: the sample set and the real test split, measured
    against the real training split, in the evaluation classifier's embedding space."""
    images, labels, metas = read_shard_set(shards)
    check_independent(classifier_dir, metas)
    net, net_config = load_classifier(classifier_dir)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    if labels.max() >= train.info.num_classes:
        raise ConfigError(f"shard labels reach {int(labels.max())} but {dataset!r} has {train.info.num_classes} classes")
    reference = real_reference(embed(net, train.images), train.labels, train.info.num_classes, config)
    percentiles = [50, 90, 95, 99]
    return tag_result("density", {
        "shards": str(shards), "dataset": dataset, "classifier": str(classifier_dir),
        "classifier_model": net_config.get("model"), "config": config_dict(config),
        "generation": provenance(metas),
        "samples": density_summary(embed(net, images), labels, predict_logits(net, images), reference, config),
        "real_test": density_summary(embed(net, test.images), test.labels, predict_logits(net, test.images),
                                     reference, config),
        "real_train_hardness_percentiles": dict(zip(
            map(str, percentiles), np.percentile(reference.train_hardness.numpy(), percentiles).round(4).tolist())),
    })
