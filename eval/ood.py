"""Out-of-distribution detection scores and metrics, following OpenOOD's postprocessors
(Yang et al., "OpenOOD: Benchmarking Generalized OOD Detection", NeurIPS D&B 2022; v1.5 defaults).

Every score is "higher = more in-distribution" and is a pure function of logits or of penultimate
features plus the classifier's linear head (weight W, bias b) and statistics of the ID training
features; OOD_SCORES registers each (ScoreSpec: what it needs, its paper), and OODScorer computes
every one that applies to a classifier:

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

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tailforge.eval.config import FAR_OOD_SETS, OODConfig
from tailforge.eval.neighbors import knn
from tailforge.eval.results import tag_result
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import LabeledImages, load_dataset

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
    s1, s2 = features.sum(1, keepdim=True), values.sum(1, keepdim=True)
    # an image whose every activation is zero (seen on far-OOD inputs) has s1 = s2 = 0: its features
    # stay zero whatever the factor, so take 1 rather than 0/0 (which OpenOOD's code turns into NaN)
    ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.ones_like(s2))
    return features * torch.exp(ratio)


def scale_score(features: Tensor, head: nn.Linear, percentile: float = 85.0) -> Tensor:
    return energy_score(head(scale_features(features, percentile)))


@dataclasses.dataclass
class TiedGaussians:
    """Class means and one precision matrix shared by every class (tied covariance) of training
    features: the Mahalanobis score's model (Lee et al. 2018). Not the per-class, shrunk Gaussians
    of Sehwag et al.'s hardness (:class:`tailforge.gen.methods.lowdensity.ClassGaussians`)."""

    means: Tensor  # [C, D] float64, one row per class present in the training labels
    precision: Tensor  # [D, D] float64 pseudo-inverse of the tied covariance


def fit_class_gaussians(features: Tensor, labels: Tensor, num_classes: int) -> TiedGaussians:
    """Class means and the tied covariance of the class-centred features (scikit-learn's
    EmpiricalCovariance, as OpenOOD's mds postprocessor; its pseudo-inverse precision)."""
    from sklearn.covariance import EmpiricalCovariance

    present = [c for c in range(num_classes) if (labels == c).any()]
    means = torch.stack([features[labels == c].double().mean(0) for c in present])
    centred = features.double() - means[torch.searchsorted(torch.tensor(present), labels)]
    cov = EmpiricalCovariance(assume_centered=True).fit(centred.numpy())
    return TiedGaussians(means=means, precision=torch.from_numpy(cov.precision_))


def mahalanobis_score(features: Tensor, gaussians: TiedGaussians) -> Tensor:
    diff = features.double()[:, None, :] - gaussians.means[None]  # N, C, D
    dist = torch.einsum("ncd,de,nce->nc", diff, gaussians.precision, diff)
    return (-dist).amax(1).float()


def _normalise(features: Tensor) -> Tensor:
    f = features.double()
    return f / (f.norm(dim=1, keepdim=True) + 1e-10)


def knn_score(features: Tensor, train_features: Tensor, k: int = 50) -> Tensor:
    """Minus the distance to the k-th nearest L2-normalised training feature (Sun et al. 2022)."""
    k = min(k, len(train_features))
    return (-knn(_normalise(features), _normalise(train_features), k).distances[:, -1]).float()


# --------------------------------------------------------------------------------------------
# Metrics


def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    """Area under the ROC curve with ID as the positive class (higher score = more ID)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores.numpy(), ood_scores.numpy()]))


#: the two FPR@95 conventions: which class is "positive" when 95 % of it must be recognised
FPR_CONVENTIONS = ("id", "ood")


def fpr_at_tpr(id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, positive: str = "id") -> float:
    """FPR at the first ROC operating point whose TPR reaches `tpr` (scikit-learn's roc_curve).

    ``positive="id"`` is the classic figure (Hendrycks & Gimpel 2017; Liang et al. 2018): the
    fraction of OOD images accepted as in-distribution when 95 % of ID images are kept.
    ``positive="ood"`` is OpenOOD v1.5's (Zhang et al. 2023): OOD is the positive class, so it is
    the fraction of ID images rejected when 95 % of OOD images are caught. The two differ whenever
    the score distributions' tails differ; results report both, labelled."""
    from sklearn.metrics import roc_curve

    if positive not in FPR_CONVENTIONS:
        raise ConfigError(f"positive must be one of {FPR_CONVENTIONS}, got {positive!r}")
    scores = np.r_[id_scores.numpy(), ood_scores.numpy()]
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    y, s = (is_id, scores) if positive == "id" else (1 - is_id, -scores)
    fpr, tprs, _ = roc_curve(y, s)
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


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """One OOD score: what it is computed from and where it comes from."""

    name: str  # its key in ood.json
    input: str  # "logits" (the classifier's output) or "features" (its penultimate embedding)
    needs: tuple[str, ...]  # "raw_logits" (not log-probabilities), or OODScorer fields fitted on ID data
    score: Callable[[Tensor, "OODScorer"], Tensor]  # (logits or features [N, ...], scorer) -> [N], higher = more ID
    paper: str  # the method's paper, author(s) and year


#: every OOD score, in the order ood.json lists them
OOD_SCORES: dict[str, ScoreSpec] = {spec.name: spec for spec in (
    ScoreSpec("msp", "logits", (), lambda logits, _: msp_score(logits), "Hendrycks & Gimpel 2017"),
    ScoreSpec("maxlogit", "logits", (), lambda logits, _: maxlogit_score(logits), "Hendrycks et al. 2022"),
    ScoreSpec("energy", "logits", ("raw_logits",), lambda logits, _: energy_score(logits), "Liu et al. 2020"),
    ScoreSpec("react", "features", ("head", "react_clip"),
              lambda f, s: react_score(f, _cpu_linear(s.head), s.react_clip), "Sun et al. 2021"),
    ScoreSpec("ash", "features", ("head",), lambda f, s: ash_score(f, _cpu_linear(s.head), s.ash_percentile),
              "Djurisic et al. 2023"),
    ScoreSpec("scale", "features", ("head",), lambda f, s: scale_score(f, _cpu_linear(s.head), s.scale_percentile),
              "Xu et al. 2024"),
    ScoreSpec("mahalanobis", "features", ("gaussians",), lambda f, s: mahalanobis_score(f, s.gaussians),
              "Lee et al. 2018"),
    ScoreSpec("knn", "features", ("train_features",), lambda f, s: knn_score(f, s.train_features, s.knn_k),
              "Sun et al. 2022"),
)}


@dataclasses.dataclass
class OODScorer:
    """Every applicable score of OOD_SCORES for one classifier, with its ID statistics fitted once."""

    classifier: nn.Module
    head: nn.Linear | None  # the linear head on timm-style features (None: no feature scores)
    log_probs: bool = False  # the classifier returns log-probabilities (an ensemble): energy is constant
    react_clip: float | None = None  # ReAct's clip value: a percentile of the ID features
    gaussians: TiedGaussians | None = None  # class means and tied covariance of the ID features
    train_features: Tensor | None = None  # the kNN bank: ID training features
    knn_k: int = 50  # K of the kNN score
    react_percentile: float = 90.0  # the percentile react_clip was fitted at
    ash_percentile: float = 90.0  # ASH-B pruning percentile
    scale_percentile: float = 85.0  # SCALE percentile

    def unavailable(self, spec: ScoreSpec) -> str | None:
        """Why `spec` cannot be computed for this classifier, or None when it can."""
        if self.head is None and (spec.input == "features" or "head" in spec.needs):
            return "the classifier exposes no linear head on timm-style features"
        if self.log_probs and "raw_logits" in spec.needs:
            return "the classifier returns log-probabilities (an ensemble), whose logsumexp is 0"
        unfitted = [need for need in spec.needs if need != "raw_logits" and getattr(self, need) is None]
        return f"not fitted: {', '.join(unfitted)}" if unfitted else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, spec in OOD_SCORES.items() if self.unavailable(spec) is None)

    def not_applicable(self) -> dict[str, str]:
        return {name: reason for name, spec in OOD_SCORES.items() if (reason := self.unavailable(spec))}

    def scores(self, images: Tensor) -> dict[str, Tensor]:
        from tailforge.gen.models.classifiers import embed, predict_logits

        specs = [OOD_SCORES[name] for name in self.names]
        inputs = {"logits": predict_logits(self.classifier, images)}
        if any(spec.input == "features" for spec in specs):
            inputs["features"] = embed(self.classifier, images)
        with torch.no_grad():
            return {spec.name: spec.score(inputs[spec.input], self) for spec in specs}


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
    """AUROC and FPR@95 of every score for every OOD set against the ID images (plus ROC curves),
    and each item's score ("per_item_scores": "id" and one entry per set), so two classifiers'
    AUROCs can be compared on the same items (eval/findings.py)."""
    id_scores = scorer.scores(id_images)

    def rounded(values: Tensor) -> list[float]:
        return [round(float(v), 6) for v in values]

    results, per_item = {}, {"id": {s: rounded(id_scores[s]) for s in scorer.names}}
    for name, images in ood_sets.items():
        scores = scorer.scores(images)
        per_item[name] = {s: rounded(scores[s]) for s in scorer.names}
        results[name] = {"num": int(len(images)), "scores": {
            s: {"auroc": auroc(id_scores[s], scores[s]), "fpr95": fpr_at_tpr(id_scores[s], scores[s]),
                "fpr95_ood_positive": fpr_at_tpr(id_scores[s], scores[s], positive="ood"),
                "roc": roc_points(id_scores[s], scores[s])} for s in scorer.names}}
    summary = {s: {m: float(np.mean([r["scores"][s][m] for r in results.values()]))
                   for m in ("auroc", "fpr95", "fpr95_ood_positive")} for s in scorer.names} if results else {}
    return tag_result("ood", {"scores_computed": list(scorer.names), "scores_not_applicable": scorer.not_applicable(),
                              "num_id": int(len(id_images)), "sets": results, "mean_over_sets": summary,
                              "per_item_scores": per_item})


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


def far_ood_set(name: str, id_test: LabeledImages, num: int) -> Tensor | None:
    """One far OOD set at the ID images' size and channels (uint8), or None when it would be the ID data itself:
    Yoon et al. 2023's procedural datasets (mondrian, gm, ri), i.i.d. Gaussian noise around mid-grey (std a
    quarter of the range, clipped), or digits test images resized to the ID size (for any other ID dataset)."""
    info = id_test.info
    if name in ("mondrian", "gm", "ri"):
        return load_dataset(f"{name}?size={info.image_size}&channels={info.channels}&test={num}&seed=1", "test").images
    if name == "noise":
        noise = torch.randn((num, info.channels, info.image_size, info.image_size),
                            generator=torch.Generator().manual_seed(1))
        return (127.5 + 64 * noise).round().clamp(0, 255).to(torch.uint8)
    if name == "digits":
        if info.spec.partition("?")[0].partition(":")[0].strip().lower() == "digits":
            return None
        return _match(load_dataset("digits", "test").images[:num], info.image_size, info.channels)
    raise ConfigError(f"unknown far OOD set {name!r}")


def default_ood_sets(id_test: LabeledImages, num: int = 500, far: Sequence[str] = FAR_OOD_SETS,
                     ) -> dict[str, tuple[str, Tensor]]:
    """Near and far OOD sets for any dataset, built at its size and channels:
    near: the ID test images rotated by 90 degrees (same strokes and statistics, wrong geometry),
    far:  the sets named in `far` (:func:`far_ood_set`)."""
    sets = {"rotated90": ("near", id_test.images.rot90(1, dims=(2, 3)).contiguous())}
    for name in far:
        images = far_ood_set(name, id_test, num)
        if images is not None:
            sets[name] = ("far", images)
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
    from tailforge.train.classifier import fit_classifier
    from tailforge.train.config import ClassifierTrainConfig

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
        sets.update(default_ood_sets(test, config.num, config.far))
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
