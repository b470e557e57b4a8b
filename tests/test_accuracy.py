"""Accuracy metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from tailforge.eval.accuracy import accuracy_report, expected_calibration_error, per_class_accuracy, top1_accuracy
from tailforge.eval.stats import decode_bits


def test_top1_and_per_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert top1_accuracy(logits, labels) == 0.75
    assert per_class_accuracy(logits, labels, 3) == [pytest.approx(2 / 3), 1.0, None]


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.55 (correct): bins (0.8667, 0.9333] and
    # (0.5333, 0.6] -> ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.575| = 0.2 + 0.2125
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4125)


def test_ece_is_zero_when_calibrated():
    probs = torch.tensor([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, torch.zeros(4, dtype=torch.long)) == 0


def test_report_fields():
    logits, labels = torch.randn(20, 4), torch.randint(4, (20,))
    report = accuracy_report(logits, labels, 4)
    assert set(report) == {"n", "top1", "per_class", "ece", "correct"} and report["n"] == 20
    # per-item correctness, in item order, agrees with top-1
    assert decode_bits(report["correct"]).tolist() == (logits.argmax(1) == labels).float().tolist()
    assert decode_bits(report["correct"]).mean() == pytest.approx(report["top1"])
