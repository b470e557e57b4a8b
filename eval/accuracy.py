"""Accuracy metrics: top-1, per-class accuracy, expected calibration error."""

from __future__ import annotations

import torch
from torch import Tensor

from tailforge.eval.stats import encode_bits


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy over the samples of each true class (None for a class with no samples)."""
    correct = logits.argmax(1) == labels
    return [float(correct[labels == c].float().mean()) if (labels == c).any() else None for c in range(num_classes)]


def expected_calibration_error(probs: Tensor, labels: Tensor, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017, Eq. 3): confidence split into `num_bins` equal-width bins,
    sum over bins of |B|/n * |accuracy(B) - confidence(B)|; 15 bins as in that paper."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=confidence.dtype)
    # bins are (lo, hi]; a confidence of exactly 0 cannot occur for a softmax over >= 1 classes
    bin_index = torch.bucketize(confidence, edges[1:-1], right=False)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(num_bins):
        members = bin_index == b
        if members.any():
            ece += members.float().mean().double() * (correct[members].mean() - confidence[members].mean()).abs().double()
    return float(ece)


def accuracy_report(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """top-1, per-class accuracy and ECE of a classifier's logits, and each item's correctness
    ("correct", in item order) so that two classifiers can be compared on the same items."""
    probs = logits.softmax(1)
    return {"n": int(len(labels)), "top1": top1_accuracy(logits, labels),
            "per_class": per_class_accuracy(logits, labels, num_classes),
            "ece": expected_calibration_error(probs, labels), "correct": encode_bits(logits.argmax(1) == labels)}
