"""OOD scores on hand-built logits and features; AUROC / FPR@95 against scikit-learn and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from torch import nn

from tailforge.eval.ood import (
    ash_b,
    ash_score,
    auroc,
    default_ood_sets,
    energy_score,
    evaluate_ood,
    fit_class_gaussians,
    fit_scorer,
    fpr_at_tpr,
    knn_score,
    mahalanobis_score,
    maxlogit_score,
    msp_score,
    react_score,
    react_threshold,
    scale_features,
    split_holdout,
)
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.models.classifiers import create_classifier


def test_logit_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert msp_score(logits).tolist() == pytest.approx([math.e**2 / (math.e**2 + 2), 1 / 3])
    assert maxlogit_score(logits).tolist() == [2.0, 1.0]
    assert energy_score(logits).tolist() == pytest.approx([math.log(math.e**2 + 2), 1 + math.log(3)])


def _identity_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, dim)
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim))
        head.bias.zero_()
    return head


def test_react_clips_at_the_percentile():
    id_features = torch.arange(1.0, 11.0).repeat(3, 1)  # values 1..10
    threshold = react_threshold(id_features, 90)
    assert threshold == pytest.approx(np.percentile(np.arange(1, 11), 90))
    f = torch.tensor([[0.5, 20.0, 3.0]])
    expected = math.log(math.exp(0.5) + math.exp(threshold) + math.exp(3.0))
    assert react_score(f, _identity_head(3), threshold).item() == pytest.approx(expected, rel=1e-5)


def test_ash_b_keeps_top_ten_percent_binarised():
    f = torch.arange(1.0, 11.0)[None]  # k = 10 - round(9) = 1: the top value 10, set to sum / k = 55
    assert ash_b(f, 90).tolist() == [[0.0] * 9 + [55.0]]
    f = torch.arange(1.0, 21.0)[None]  # k = 20 - 18 = 2: indices 18, 19 set to 210 / 2
    expected = [0.0] * 18 + [105.0, 105.0]
    assert ash_b(f, 90).tolist() == [expected]
    assert ash_score(f, _identity_head(20), 90).item() == pytest.approx(math.log(18 + 2 * math.exp(105.0)), rel=1e-6)


def test_scale_multiplies_by_exp_of_sum_ratio():
    f = torch.arange(1.0, 21.0)[None]  # percentile 85: k = 20 - round(17) = 3, top sum 18+19+20 = 57
    scaled = scale_features(f, 85)
    assert torch.allclose(scaled, f * math.exp(210 / 57))


def test_mahalanobis_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=gen) + torch.tensor([3.0, 0, 0, 0]) * (torch.arange(60) % 2)[:, None]
    labels = torch.arange(60) % 2
    gaussians = fit_class_gaussians(features, labels, 2)
    means = [features[labels == c].double().mean(0).numpy() for c in range(2)]
    centred = np.concatenate([features[labels == c].double().numpy() - means[c] for c in range(2)])
    precision = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
    query = torch.randn(5, 4, generator=gen)
    expected = [max(-(q - m) @ precision @ (q - m) for m in means) for q in query.double().numpy()]
    assert mahalanobis_score(query, gaussians).tolist() == pytest.approx(expected, rel=1e-5)


def test_knn_score_is_minus_kth_normalised_distance():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[2.0, 0.0]])  # normalised (1, 0): distances 0, sqrt 2, 2
    assert knn_score(query, train, k=2).item() == pytest.approx(-math.sqrt(2), rel=1e-6)
    assert knn_score(query, train, k=3).item() == pytest.approx(-2.0, rel=1e-6)


def test_auroc_and_fpr95_against_references():
    gen = torch.Generator().manual_seed(1)
    id_scores, ood_scores = torch.randn(300, generator=gen) + 1.0, torch.randn(200, generator=gen)
    y = np.r_[np.ones(300), np.zeros(200)]
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(y, np.r_[id_scores, ood_scores]))
    # Mann-Whitney form: P(ID score > OOD score) (no ties among continuous draws)
    assert auroc(id_scores, ood_scores) == pytest.approx(float((id_scores[:, None] > ood_scores[None]).double().mean()))
    # brute force: the highest threshold keeping >= 95 % of ID, and the OOD fraction it keeps
    thresholds = torch.sort(torch.cat([id_scores, ood_scores]), descending=True).values
    t = next(t for t in thresholds if (id_scores >= t).double().mean() >= 0.95)
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(float((ood_scores >= t).double().mean()))
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert fpr_at_tpr(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    # OpenOOD v1.5's convention, OOD positive: the lowest threshold catching >= 95 % of OOD (scores
    # at or below it), and the ID fraction it rejects with them
    t = next(t for t in thresholds.flip(0) if (ood_scores <= t).double().mean() >= 0.95)
    assert fpr_at_tpr(id_scores, ood_scores, positive="ood") == pytest.approx(float((id_scores <= t).double().mean()))
    assert fpr_at_tpr(id_scores, ood_scores, positive="ood") != pytest.approx(fpr_at_tpr(id_scores, ood_scores))


def test_the_two_fpr95_conventions_differ_when_the_tails_do():
    # 15 % of the OOD images look like ID ones: keeping 95 % of ID admits most of those (about
    # 0.14 of OOD), but catching 95 % of OOD must also reject two thirds of that near-ID group's
    # look-alikes, and with them about two thirds of the ID images
    gen = torch.Generator().manual_seed(3)
    id_scores = 1.0 + 0.1 * torch.randn(4000, generator=gen)
    far, near = -3.0 + 0.5 * torch.randn(3400, generator=gen), 1.0 + 0.1 * torch.randn(600, generator=gen)
    classic, openood = fpr_at_tpr(id_scores, torch.cat([far, near])), fpr_at_tpr(id_scores, torch.cat([far, near]),
                                                                                  positive="ood")
    assert 0.1 < classic < 0.2 and 0.55 < openood < 0.75


def test_scorer_on_a_classifier_and_on_log_probabilities():
    torch.manual_seed(0)
    train = load_dataset("digits?n=200")
    test = load_dataset("digits", "test").subset(range(60))
    net = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    sets = {name: images[:40] for name, (_, images) in default_ood_sets(test, num=40).items()}
    # digits is the ID data here, so it is not one of its own far sets
    assert set(sets) == {"rotated90", "mondrian", "gm", "ri", "noise"} and all(s.shape[1:] == (1, 8, 8) for s in sets.values())
    report = evaluate_ood(fit_scorer(net, train, knn_k=10), test.images, sets)
    assert report["scores_computed"] == ["msp", "maxlogit", "energy", "react", "ash", "scale", "mahalanobis", "knn"]
    for result in report["sets"].values():
        assert all(0.0 <= v["auroc"] <= 1.0 and 0.0 <= v["fpr95"] <= 1.0 for v in result["scores"].values())

    # an ensemble-style module returning log-probabilities: no features, energy constant
    log_probs = nn.Sequential(net, nn.LogSoftmax(1))
    report = evaluate_ood(fit_scorer(log_probs, train), test.images, {"ri": sets["ri"]})
    assert report["scores_computed"] == ["msp", "maxlogit"]
    assert set(report["scores_not_applicable"]) == {"energy", "react", "ash", "scale", "mahalanobis", "knn"}


def test_holdout_split_renumbers_classes():
    train, test = load_dataset("digits?n=300"), load_dataset("digits", "test")
    id_train, id_test, held, keep = split_holdout(train, test, [8, 9])
    assert keep == list(range(8)) and id_train.info.num_classes == 8
    assert int(id_train.labels.max()) == 7 and len(held) == int((test.labels >= 8).sum())
    assert len(id_test) + len(held) == len(test)


def test_scale_of_an_all_zero_feature_vector_is_finite():
    # far-OOD images can switch every ReLU off: SCALE's s1 / s2 is then 0 / 0
    features = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    scaled = scale_features(features, percentile=50)
    assert torch.isfinite(scaled).all() and scaled[0].abs().sum() == 0
    assert torch.allclose(scaled[1], features[1] * torch.exp(torch.tensor(10.0 / 7.0)))


def test_far_sets_at_another_datasets_size_include_resized_digits_and_noise():
    test = load_dataset("mondrian?size=16&channels=3&test=20", "test")
    sets = default_ood_sets(test, num=30)
    assert set(sets) == {"rotated90", "mondrian", "gm", "ri", "noise", "digits"}
    assert all(images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8 for _, images in sets.values())
    assert sets["digits"][1].shape[0] == 30 and sets["digits"][1].float().std() > 10  # strokes, not a blank
    noise = sets["noise"][1].float()
    assert abs(noise.mean() - 127.5) < 3 and 55 < noise.std() < 70
    assert set(default_ood_sets(test, num=5, far=("noise",))) == {"rotated90", "noise"}
