"""Out-of-distribution detection scores and metrics, following OpenOOD's postprocessors
(Yang et al., "OpenOOD: Benchmarking Generalized OOD Detection", NeurIPS D&B 2022; v1.5 defaults).

Every score is "higher = more in-distribution" and is a pure function of logits or of penultimate
features plus the classifier's linear head (weight W, bias b):

    msp        max softmax probability (Hendrycks & Gimpel 2017)
    maxlogit   max logit (Hendrycks et al. 2022)
    energy     logsumexp of the logits, i.e. minus the free energy at T = 1 (Liu et al. 2020)
    react      energy of W clip(f, max=c) + b, c the 90th percentile of ID features (Sun et al. 2021)
    ash        energy after ASH-B at percentile 90 on the penultimate features: keep the top 10 %
               of each feature vector, set them to sum(f)/k and the rest to 0 (Djurisic et al. 2023;
               OpenOOD applies it to the pooled features of its networks)
    scale      energy of W (f * exp(s1/s2)) + b, s1 the sum of f and s2 the sum of its top 15 %
               (percentile 85; Xu et al. 2024, "SCALE")
    mahalanobis  max over classes of minus the Mahalanobis distance to the class mean with one
               shared (tied) covariance of the training features (Lee et al. 2018, without input
               preprocessing, as OpenOOD's "mds")
    knn        minus the distance to the K-th nearest L2-normalised training feature, K = 50
               (Sun et al. 2022, OpenOOD's CIFAR setting)

Metrics (scikit-learn): AUROC with ID as the positive class, and FPR@95TPR, the fraction of OOD
samples scored above the threshold that keeps 95 % of ID samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import LabeledImages, load_dataset

LOGIT_SCORES = ("msp", "maxlogit", "energy")
FEATURE_SCORES = ("react", "ash", "scale", "mahalanobis", "knn")


# --------------------------------------------------------------------------------------------
# Scores: pure functions


def msp_score(logits: Tensor) -> Tensor:
    return logits.softmax(1).amax(1)


def maxlogit_score(logits: Tensor) -> Tensor:
    return logits.amax(1)


def energy_score(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, 1)


def react_threshold(id_features: Tensor, percentile: float = 90.0) -> float:
    """ReAct's clip value: the percentile of all ID feature activations (OpenOOD: the ID
    validation set; here the data the caller fits on)."""
    return float(np.percentile(id_features.flatten().numpy(), percentile))


def react_score(features: Tensor, head: nn.Linear, threshold: float) -> Tensor:
    return energy_score(head(features.clamp(max=threshold)))


def _top_k(features: Tensor, percentile: float) -> tuple[Tensor, Tensor, int]:
    """Values and indices of each row's top k = n - round(n * percentile / 100) entries (ASH's k)."""
    n = features.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    if k < 1:
        raise ConfigError(f"percentile {percentile} keeps no feature of {n}")
    values, index = features.topk(k, dim=1)
    return values, index, k


def ash_b(features: Tensor, percentile: float = 90.0) -> Tensor:
    """ASH-B: prune all but the top k activations and binarise them to sum(f) / k."""
    _, index, k = _top_k(features, percentile)
    fill = (features.sum(1, keepdim=True) / k).expand(-1, k)
    return torch.zeros_like(features).scatter(1, index, fill)


def ash_score(features: Tensor, head: nn.Linear, percentile: float = 90.0) -> Tensor:
    return energy_score(head(ash_b(features, percentile)))


def scale_features(features: Tensor, percentile: float = 85.0) -> Tensor:
    """SCALE: multiply the (unpruned) features by exp(s1 / s2), s1 the sum of all activations and
    s2 the sum of the top k."""
    values, _, _ = _top_k(features, percentile)
    return features * torch.exp(features.sum(1, keepdim=True) / values.sum(1, keepdim=True))


def scale_score(features: Tensor, head: nn.Linear, percentile: float = 85.0) -> Tensor:
    return energy_score(head(scale_features(features, percentile)))


@dataclasses.dataclass
class ClassGaussians:
    """Class means and the shared precision matrix of training features (Mahalanobis score)."""

    means: Tensor  # [C, D]
    precision: Tensor  # [D, D]


def fit_class_gaussians(features: Tensor, labels: Tensor, num_classes: int) -> ClassGaussians:
    """Class means and the tied covariance of the class-centred features (scikit-learn's
    EmpiricalCovariance, as OpenOOD's mds postprocessor; its pseudo-inverse precision)."""
    from sklearn.covariance import EmpiricalCovariance

    present = [c for c in range(num_classes) if (labels == c).any()]
    means = torch.stack([features[labels == c].double().mean(0) for c in present])
    centred = features.double() - means[torch.searchsorted(torch.tensor(present), labels)]
    cov = EmpiricalCovariance(assume_centered=True).fit(centred.numpy())
    return ClassGaussians(means=means, precision=torch.from_numpy(cov.precision_))


def mahalanobis_score(features: Tensor, gaussians: ClassGaussians) -> Tensor:
    diff = features.double()[:, None, :] - gaussians.means[None]  # N, C, D
    dist = torch.einsum("ncd,de,nce->nc", diff, gaussians.precision, diff)
    return (-dist).amax(1).float()


def _normalise(features: Tensor) -> np.ndarray:
    f = features.double().numpy()
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-10)


def knn_score(features: Tensor, train_features: Tensor, k: int = 50) -> Tensor:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(train_features))
    index = NearestNeighbors(n_neighbors=k).fit(_normalise(train_features))
    dist, _ = index.kneighbors(_normalise(features))
    return torch.from_numpy(-dist[:, -1]).float()


# --------------------------------------------------------------------------------------------
# Metrics


def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    """Area under the ROC curve with ID as the positive class (higher score = more ID)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores.numpy(), ood_scores.numpy()]))


def fpr_at_tpr(id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95) -> float:
    """FPR at the first ROC operating point whose TPR (ID kept) reaches `tpr` (scikit-learn's
    roc_curve, as OpenOOD computes FPR@95)."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tprs, _ = roc_curve(y, np.r_[id_scores.numpy(), ood_scores.numpy()])
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def roc_points(id_scores: Tensor, ood_scores: Tensor, max_points: int = 200) -> dict[str, list[float]]:
    """A thinned ROC curve (FPR, TPR) for plotting."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_scores.numpy(), ood_scores.numpy()])
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).round().astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}


# --------------------------------------------------------------------------------------------
# Scorer: fitted once on ID training data, then applied to any image set


@dataclasses.dataclass
class OODScorer:
    """Every applicable score for one classifier, with its ID statistics fitted once."""

    classifier: nn.Module
    head: nn.Linear | None
    log_probs: bool = False  # the classifier returns log-probabilities (an ensemble): energy is constant
    react_clip: float | None = None
    gaussians: ClassGaussians | None = None
    train_features: Tensor | None = None
    knn_k: int = 50
    react_percentile: float = 90.0
    ash_percentile: float = 90.0
    scale_percentile: float = 85.0

    @property
    def names(self) -> tuple[str, ...]:
        logit = tuple(s for s in LOGIT_SCORES if not (self.log_probs and s == "energy"))
        return logit + (FEATURE_SCORES if self.head is not None else ())

    def not_applicable(self) -> dict[str, str]:
        reasons = {s: "the classifier exposes no linear head on timm-style features"
                   for s in FEATURE_SCORES if self.head is None}
        if self.log_probs:
            reasons["energy"] = "the classifier returns log-probabilities (an ensemble), whose logsumexp is 0"
        return reasons

    def scores(self, images: Tensor) -> dict[str, Tensor]:
        from tailforge.gen.models.classifiers import embed, predict_logits

        logits = predict_logits(self.classifier, images)
        out = {"msp": msp_score(logits), "maxlogit": maxlogit_score(logits)}
        if not self.log_probs:
            out["energy"] = energy_score(logits)
        if self.head is None:
            return out
        features = embed(self.classifier, images)
        head = _cpu_linear(self.head)
        with torch.no_grad():
            out["react"] = react_score(features, head, self.react_clip)
            out["ash"] = ash_score(features, head, self.ash_percentile)
            out["scale"] = scale_score(features, head, self.scale_percentile)
        out["mahalanobis"] = mahalanobis_score(features, self.gaussians)
        out["knn"] = knn_score(features, self.train_features, self.knn_k)
        return out


def _cpu_linear(head: nn.Linear) -> nn.Linear:
    cpu = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    cpu.load_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()})
    return cpu.eval()


def fit_scorer(classifier: nn.Module, fit: LabeledImages, *, knn_k: int = 50, react_percentile: float = 90.0,
               ash_percentile: float = 90.0, scale_percentile: float = 85.0) -> OODScorer:
    """Fit the feature statistics (ReAct clip value, class Gaussians, kNN bank) on ID training
    images. A classifier without a linear head on timm-style features gets the logit scores only."""
    from tailforge.eval.features import linear_head
    from tailforge.gen.models.classifiers import embed, predict_logits

    sums = torch.logsumexp(predict_logits(classifier, fit.images[:64]), 1)
    log_probs = bool(torch.allclose(sums, torch.zeros_like(sums), atol=1e-4))
    settings = dict(log_probs=log_probs, knn_k=knn_k, react_percentile=react_percentile, ash_percentile=ash_percentile,
                    scale_percentile=scale_percentile)
    head = linear_head(classifier)
    if head is None:
        return OODScorer(classifier, None, **settings)
    features = embed(classifier, fit.images)
    return OODScorer(classifier, head, react_clip=react_threshold(features, react_percentile), train_features=features,
                     gaussians=fit_class_gaussians(features, fit.labels, fit.info.num_classes), **settings)


def evaluate_ood(scorer: OODScorer, id_images: Tensor, ood_sets: dict[str, Tensor]) -> dict[str, Any]:
    """AUROC and FPR@95 of every score for every OOD set against the ID images (plus ROC curves)."""
    id_scores = scorer.scores(id_images)
    results = {}
    for name, images in ood_sets.items():
        scores = scorer.scores(images)
        results[name] = {"num": int(len(images)), "scores": {
            s: {"auroc": auroc(id_scores[s], scores[s]), "fpr95": fpr_at_tpr(id_scores[s], scores[s]),
                "roc": roc_points(id_scores[s], scores[s])} for s in scorer.names}}
    summary = {s: {"auroc": float(np.mean([r["scores"][s]["auroc"] for r in results.values()])),
                   "fpr95": float(np.mean([r["scores"][s]["fpr95"] for r in results.values()]))}
               for s in scorer.names} if results else {}
    return {"scores_computed": list(scorer.names), "scores_not_applicable": scorer.not_applicable(),
            "num_id": int(len(id_images)), "sets": results, "mean_over_sets": summary}


# --------------------------------------------------------------------------------------------
# OOD sets


def _match(images: Tensor, size: int, channels: int) -> Tensor:
    """Resize (area / bilinear) and convert channels so another dataset's images fit the classifier."""
    import torch.nn.functional as F

    x = images.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear", align_corners=None)
    return x.round().clamp(0, 255).to(torch.uint8)


def default_ood_sets(id_test: LabeledImages, num: int = 500) -> dict[str, tuple[str, Tensor]]:
    """Near and far OOD sets for any dataset, built at its size and channels:
    near: the ID test images rotated by 90 degrees (same strokes and statistics, wrong geometry),
    far:  seed 004's procedural datasets (Mondrian, Gaussian-mixture dummies, Random Ink)."""
    info = id_test.info
    sets = {"rotated90": ("near", id_test.images.rot90(1, dims=(2, 3)).contiguous())}
    for name in ("mondrian", "gm", "ri"):
        spec = f"{name}?size={info.image_size}&channels={info.channels}&test={num}&seed=1"
        sets[name] = ("far", load_dataset(spec, "test").images)
    return sets


def split_holdout(train: LabeledImages, test: LabeledImages, holdout: Sequence[int]
                  ) -> tuple[LabeledImages, LabeledImages, Tensor, list[int]]:
    """Open-set split: the classes in `holdout` leave the ID data (the kept classes renumbered
    0..K-1) and their test images become the near-OOD set. Returns ID train, ID test, the held-out
    test images and the kept classes."""
    keep = [c for c in range(train.info.num_classes) if c not in set(holdout)]
    if not keep or len(keep) == train.info.num_classes:
        raise ConfigError(f"--holdout-classes {list(holdout)} must name some but not all of the "
                          f"{train.info.num_classes} classes")
    remap = torch.full((train.info.num_classes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    info = dataclasses.replace(train.info, num_classes=len(keep), class_names=tuple(train.info.class_names[c] for c in keep))

    def id_part(data: LabeledImages) -> LabeledImages:
        part = data.subset(torch.nonzero(remap[data.labels] >= 0).flatten())
        return dataclasses.replace(part, labels=remap[part.labels], info=info)

    return id_part(train), id_part(test), test.images[remap[test.labels] < 0], keep


# --------------------------------------------------------------------------------------------
# `tailforge eval ood`


@dataclasses.dataclass(frozen=True)
class OODConfig:
    """`tailforge eval ood`; copied into ood.json."""

    dataset: str  # ID dataset spec: its training split fits the feature statistics, its test split is ID
    classifier: str | None = None  # classifier folder (None: train one, see holdout_classes)
    diffaug_ensemble: str | None = None  # diffusion model folder: evaluate DiffAug-Ensemble of the classifier
    ood: tuple[str, ...] = ()  # extra OOD dataset specs (their test split if they have one)
    default_sets: bool = True  # add the rotated-ID near set and the procedural far sets
    num: int = 500  # images per OOD set
    holdout_classes: tuple[int, ...] = ()  # open-set protocol: train without these, their test images are near-OOD
    model: str = "tinycnn"  # with holdout_classes: timm model to train
    epochs: int = 30  # with holdout_classes: training epochs
    seed: int = 0  # with holdout_classes: training seed
    knn_k: int = 50  # K of the kNN score (OpenOOD's CIFAR setting)
    react_percentile: float = 90.0  # ReAct clip percentile of ID features
    ash_percentile: float = 90.0  # ASH-B pruning percentile
    scale_percentile: float = 85.0  # SCALE percentile


def _classifier_for(config: OODConfig, train: LabeledImages, test: LabeledImages, device: str | None, progress: bool):
    """The classifier to score with, what it is, and the ID data (open-set: without the held-out
    classes) plus the held-out classes' test images."""
    from tailforge.eval.features import load_eval_classifier, wrap_diffaug_ensemble

    if not config.holdout_classes:
        if not config.classifier:
            raise ConfigError("give --classifier DIR, or --holdout-classes to train one without those classes")
        classifier, described = load_eval_classifier(config.classifier, diffaug_ensemble=config.diffaug_ensemble,
                                                     device=device)
        return classifier, described, train, test, None
    from tailforge.train.classifier import ClassifierTrainConfig, fit_classifier

    train, test, held, keep = split_holdout(train, test, config.holdout_classes)
    trained = ClassifierTrainConfig(dataset=config.dataset, model=config.model, epochs=config.epochs, seed=config.seed)
    classifier = fit_classifier(trained, train, test, device=device, progress=progress)
    if config.diffaug_ensemble:
        classifier = wrap_diffaug_ensemble(classifier, config.diffaug_ensemble)
    return classifier, {"trained_on_classes": keep}, train, test, held


def run_ood(config: OODConfig, out: str | Path, *, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ID and every OOD set, write OUT/ood.json."""
    from tailforge.gen.core.errors import DatasetError
    from tailforge.gen.core.files import config_dict, write_json_atomic

    started = time.perf_counter()
    train, test = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "test")
    classifier, described, train, test, held = _classifier_for(config, train, test, device, progress)
    sets = {} if held is None else {"heldout_classes": ("near", held)}
    if config.default_sets:
        sets.update(default_ood_sets(test, config.num))
    for spec in config.ood:
        try:
            data = load_dataset(spec, "test")
        except DatasetError:
            data = load_dataset(spec, "train")
        sets[spec] = ("user", _match(data.images[:config.num], test.info.image_size, test.info.channels))
    if not sets:
        raise ConfigError("no OOD sets: drop --no-default-sets or add --ood SPEC")
    scorer = fit_scorer(classifier, train, knn_k=config.knn_k, react_percentile=config.react_percentile,
                        ash_percentile=config.ash_percentile, scale_percentile=config.scale_percentile)
    report = evaluate_ood(scorer, test.images, {name: images for name, (_, images) in sets.items()})
    for name, (kind, _) in sets.items():
        report["sets"][name]["kind"] = kind
    report["config"] = {**config_dict(config), **described, "fit_on": "ID training split"}
    report["seconds"] = round(time.perf_counter() - started, 2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "ood.json", report)
    return report


def run_cli(args: argparse.Namespace) -> int:
    from tailforge.cli.util import print_json

    holdout = tuple(int(c) for c in args.holdout_classes.split(",")) if args.holdout_classes else ()
    config = OODConfig(dataset=args.dataset, classifier=args.classifier, diffaug_ensemble=args.diffaug_ensemble,
                       ood=tuple(args.ood or ()), default_sets=not args.no_default_sets, num=args.num,
                       holdout_classes=holdout, model=args.model, epochs=args.epochs, seed=args.seed, knn_k=args.knn_k)
    report = run_ood(config, args.out, device=args.device, progress=not args.quiet)
    table = {name: {s: round(v["auroc"], 4) for s, v in r["scores"].items()} for name, r in report["sets"].items()}
    print_json({"out": str(Path(args.out) / "ood.json"), "auroc": table})
    return 0


def register(group: argparse._SubParsersAction) -> None:
    from tailforge.cli.util import add_command, positive_int
    from tailforge.eval.features import add_classifier_options

    parser = add_command(
        group, "ood", "OOD detection: MSP, energy, MaxLogit, ReAct, ASH, SCALE, Mahalanobis, kNN", run_cli,
        description="Score the ID test split and each OOD set with OpenOOD's postprocessors (feature statistics "
                    "fitted on the ID training split) and report AUROC and FPR@95TPR per set. Default sets, at the "
                    "dataset's size: near = the ID test images rotated 90 degrees, far = mondrian, gm, ri. "
                    "--holdout-classes trains a fresh classifier without those classes and adds their test images "
                    "as a near-OOD set (open-set protocol). Writes OUT/ood.json with ROC curves.")
    add_classifier_options(parser, required=False)
    parser.add_argument("--dataset", required=True, help="ID dataset spec (train split fits, test split is ID)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--ood", action="append", metavar="SPEC",
                        help="an extra OOD dataset spec (test split if it has one); repeatable")
    parser.add_argument("--no-default-sets", action="store_true", help="only the --ood / held-out sets")
    parser.add_argument("--num", type=positive_int, default=500, help="images per OOD set")
    parser.add_argument("--knn-k", type=positive_int, default=50, help="K of the kNN score")
    parser.add_argument("--holdout-classes", default=None, metavar="C,C,...",
                        help="train a classifier without these classes; their test images are near-OOD")
    parser.add_argument("--model", default="tinycnn", help="with --holdout-classes: timm model to train")
    parser.add_argument("--epochs", type=positive_int, default=30, help="with --holdout-classes: training epochs")
    parser.add_argument("--seed", type=int, default=0, help="with --holdout-classes: training seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
