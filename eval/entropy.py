"""Output entropy of a classifier on a dataset (Yamaguchi & Fukuda 2023, Eq. 4 and Fig. 5).

H_theta(y) = -1/N sum_i sum_j p_theta(y = j | x_i) log p_theta(y = j | x_i), with p_theta the
softmax of the classifier's logits: the mean over the dataset of each prediction's entropy (nats).
Yamaguchi & Fukuda 2023 measures it with the classifier trained on real data on reconstructed sets of growing
t_re: lower entropy means samples that are easier to classify, closer to the modes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tailforge.eval.results import tag_result


def output_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (nats) of softmax(logits), computed from log_softmax so that a
    probability that underflows to 0 contributes 0 (p log p -> 0) instead of NaN."""
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def mean_output_entropy(logits: Tensor) -> float:
    """Eq. 4 of Yamaguchi & Fukuda 2023: the mean of the per-sample entropies."""
    if len(logits) == 0:
        raise ValueError("output entropy of an empty dataset is undefined")
    return float(output_entropy(logits).mean())


def entropy_report(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Eq. 4 over the whole set and per true class, with the classifier's top-1 on the same set."""
    mean = mean_output_entropy(logits)
    per_sample = output_entropy(logits)
    per_class = [float(per_sample[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"n": int(len(labels)), "mean_entropy": mean,
            "per_class_mean_entropy": per_class,
            "top1": float((logits.argmax(1) == labels).float().mean()),
            "max_entropy": float(torch.log(torch.tensor(float(num_classes))))}


def evaluate_entropy(classifier: str, datasets: Sequence[str], split: str, device: str | None = None) -> dict:
    """The `tailforge eval entropy` result: entropy_report of the saved classifier on each dataset."""
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import load_classifier, predict_logits

    model, config = load_classifier(classifier, device or "cpu")
    report = tag_result("entropy", {"classifier": classifier, "split": split, "datasets": {}})
    for spec in datasets:
        data = load_dataset(spec, split)
        report["datasets"][spec] = entropy_report(predict_logits(model, data.images), data.labels,
                                                  int(config["num_classes"]))
    return report
