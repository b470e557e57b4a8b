"""Density metrics (Sehwag et al. 2022 Sec. 4.2) against brute-force and hand-written references: AvgkNN,
LOF (Breunig et al. 2000), k-NN precision/recall (Kynkaanniemi et al. 2019), cross-fitted hardness;
and `tailforge eval density` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tailforge.eval.config import DensityConfig
from tailforge.eval.density import (
    avg_knn_distance,
    crossfit_hardness,
    evaluate_density,
    knn_radii,
    lof_scores,
    manifold_coverage,
    precision_recall,
)
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import file_sha256
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import ShardRecord, ShardSpec, encode_sample
from tailforge.gen.data.shards.write import save_record, write_manifest, write_shard
from tailforge.gen.methods.lowdensity import fit_class_gaussians, hardness
from tailforge.gen.models.classifiers import save_classifier


def pairwise(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


@pytest.fixture(scope="module")
def clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(45, 4, generator=g, dtype=torch.float64) * 1.3 + 0.4
    return real, fake


def test_avg_knn_is_the_mean_distance_to_the_k_nearest(clouds):
    real, fake = clouds
    d = pairwise(fake.numpy(), real.numpy())
    np.testing.assert_allclose(avg_knn_distance(fake, real, 5).numpy(), np.sort(d, 1)[:, :5].mean(1), rtol=1e-10)
    self_d = np.sort(pairwise(real.numpy(), real.numpy()), 1)[:, 1:6].mean(1)
    np.testing.assert_allclose(avg_knn_distance(real, real, 5, exclude_self=True).numpy(), self_d, rtol=1e-10)


def test_lof_matches_breunig_et_al_by_hand(clouds):
    """LOF(q) = mean over q's k nearest reference points o of lrd(o) / lrd(q), lrd the inverse mean
    reachability distance max(k-distance(o), d(q, o)) (Breunig et al. 2000, Def. 4-7)."""
    real, fake = (t.numpy() for t in clouds)
    k = 7
    rr = pairwise(real, real)
    np.fill_diagonal(rr, np.inf)
    nn_r = np.argsort(rr, 1)[:, :k]
    kdist = np.sort(rr, 1)[:, k - 1]
    lrd_real = 1 / np.array([np.maximum(kdist[nn_r[i]], rr[i, nn_r[i]]).mean() for i in range(len(real))])
    fr = pairwise(fake, real)
    nn_f = np.argsort(fr, 1)[:, :k]
    lrd_fake = 1 / np.array([np.maximum(kdist[nn_f[i]], fr[i, nn_f[i]]).mean() for i in range(len(fake))])
    expected = np.array([lrd_real[nn_f[i]].mean() / lrd_fake[i] for i in range(len(fake))])
    np.testing.assert_allclose(lof_scores(clouds[1], clouds[0], k).numpy(), expected, rtol=1e-6)


def test_precision_recall_match_brute_force_in_small_chunks(clouds):
    real, fake = clouds
    k = 3
    radius_real = np.sort(pairwise(real.numpy(), real.numpy()), 1)[:, k]
    radius_fake = np.sort(pairwise(fake.numpy(), fake.numpy()), 1)[:, k]
    precision = (pairwise(fake.numpy(), real.numpy()) <= radius_real[None]).any(1).mean()
    recall = (pairwise(real.numpy(), fake.numpy()) <= radius_fake[None]).any(1).mean()
    np.testing.assert_allclose(knn_radii(real, k, chunk_size=7).numpy(), radius_real, rtol=1e-12)
    result = precision_recall(real, fake, k, chunk_size=7)
    assert 0 < precision < 1 and 0 < recall < 1
    assert result == pytest.approx({"precision": precision, "recall": recall})
    assert manifold_coverage(fake, real, knn_radii(real, k), chunk_size=4).double().mean() == pytest.approx(precision)


def test_precision_recall_extremes(clouds):
    real, _ = clouds
    assert precision_recall(real, real.clone(), 3) == {"precision": 1.0, "recall": 1.0}
    far = real + 100
    assert precision_recall(real, far, 3) == {"precision": 0.0, "recall": 0.0}


def test_crossfit_hardness_scores_each_fold_with_gaussians_fitted_without_it():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(80, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(80) % 2
    out = crossfit_hardness(feats, labels, 2, folds=2, shrinkage="none", seed=5)
    order = torch.randperm(80, generator=torch.Generator().manual_seed(5))
    fold, rest = order[:40], order[40:]
    gauss = fit_class_gaussians(feats[rest], labels[rest], 2, "none")
    torch.testing.assert_close(out[fold], hardness(feats[fold], labels[fold], gauss).double(), rtol=1e-5, atol=1e-5)
    in_sample = hardness(feats, labels, fit_class_gaussians(feats, labels, 2, "none")).double()
    assert out.median() > in_sample.median()  # the optimism that cross-fitting removes


@pytest.fixture(scope="module")
def eval_classifier(tmp_path_factory):
    from tailforge.train.classifier import fit_classifier
    from tailforge.train.config import ClassifierTrainConfig

    train = load_dataset("digits?n=200", "train")
    model = fit_classifier(ClassifierTrainConfig(model="tinycnn", epochs=2), train, progress=False)
    folder = tmp_path_factory.mktemp("eval_classifier")
    save_classifier(folder, model, {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    return folder


def write_sample_set(root, images, labels, meta):
    spec = ShardSpec(job="t", index=0, start=0, count=len(labels), seed=0)
    samples = [encode_sample(f"t-{i:09d}", images[i].permute(1, 2, 0).numpy(), int(labels[i]), meta)
               for i in range(len(labels))]
    sha, size = write_shard(root, spec, samples)
    record = ShardRecord(name=spec.name, index=0, start=0, count=spec.count, sha256=sha, size_bytes=size, seconds=0.0,
                         model_evals=0, worker="test")
    save_record(root, record)
    write_manifest(root, [record], extra={"num_classes": 10})


def test_eval_density_end_to_end(tmp_path, eval_classifier):
    test = load_dataset("digits", "test")
    write_sample_set(tmp_path, test.images[:50], test.labels[:50],
                     {"kind": "lowdensity", "alpha": 0.5, "beta": 0.5, "guidance_input": "x0"})
    report = evaluate_density(tmp_path, "digits?n=200", eval_classifier, DensityConfig(folds=3))
    samples, real = report["samples"], report["real_test"]
    assert samples["num"] == 50 and real["num"] == 360
    assert report["generation"] == {"kind": "lowdensity", "alpha": 0.5, "beta": 0.5, "guidance_input": "x0"}
    for metric in ("hardness", "avg_knn", "lof"):
        assert set(samples[metric]) == {"median", "mean", "q25", "q75"}
    assert 0 <= samples["precision"] <= 1 and 0 <= samples["accuracy"] <= 1
    assert list(report["real_train_hardness_percentiles"]) == ["50", "90", "95", "99"]


def test_eval_density_refuses_the_guidance_classifier(tmp_path, eval_classifier):
    test = load_dataset("digits", "test")
    sha = file_sha256(eval_classifier / "classifier.safetensors")
    write_sample_set(tmp_path, test.images[:10], test.labels[:10], {"guidance_classifier_sha256": sha})
    with pytest.raises(ConfigError, match="guided these samples"):
        evaluate_density(tmp_path, "digits?n=200", eval_classifier, DensityConfig())


def test_bin_costs_charge_every_generated_sample_to_the_accepted_ones():
    """Hand-computed: rejection pays 8 s for 4 samples, guided 6 s for 3; per bin, cost per accepted
    sample is the whole run's cost over the samples that landed in the bin. Bins are bounded: the
    last one is closed at the top edge and a sample above it is in no bin."""
    from tailforge.bench.lowdensity import bin_costs

    scores = {"baseline": np.array([0.5, 1.5, 2.5, 0.1]), "guided": np.array([1.2, 2.2, 3.0])}
    cost = {"baseline": {"seconds": 8.0, "unet_evals": 40}, "guided": {"seconds": 6.0, "unet_evals": 30, "all_evals": 42}}
    low, high, empty = bin_costs([1.0, 2.0, 10.0, 20.0], scores, cost)
    assert (low["low"], low["high"], high["high"], empty["high"]) == (1.0, 2.0, 10.0, 20.0)
    assert low["baseline"] == {"accepted": 1, "acceptance": 0.25, "seconds_per_accepted": 8.0, "unet_evals_per_accepted": 40.0}
    assert low["guided"]["seconds_per_accepted"] == 6.0 and low["guided"]["all_evals_per_accepted"] == 42.0
    assert (low["ratio_seconds"], low["ratio_unet_evals"]) == (1.333, 1.333)
    assert high["guided"]["accepted"] == 2 and (high["ratio_seconds"], high["ratio_unet_evals"]) == (2.667, 2.667)
    assert "ratio_all_evals" not in high and low["filled"] and high["filled"]
    assert empty["ratio_seconds"] is None and not empty["filled"]
    # the top edge is inside the last bin, anything above it in none
    top = bin_costs([1.0, 3.0], {"baseline": np.array([3.0, 3.5]), "guided": np.array([2.0])}, cost)
    assert len(top) == 1 and top[0]["baseline"]["accepted"] == 1
    # Per bin, the fraction of accepted samples the evaluation classifier puts in their class; acceptance unchanged.
    faithful = {"baseline": np.array([True, False, True, True]), "guided": np.array([True, False, True])}
    low, high, empty = bin_costs([1.0, 2.0, 10.0, 20.0], scores, cost, faithful)
    assert (low["baseline"]["faithful"], low["guided"]["faithful"], high["guided"]["faithful"]) == (0.0, 1.0, 0.5)
    assert high["guided"]["accepted"] == 2 and empty["baseline"]["faithful"] is None


def test_bin_cost_ratio_intervals_come_from_resampled_acceptance():
    """Every sample of both sides in the bin: acceptance cannot vary, so the interval is the point
    ratio; half accepted on each side: the interval is wide and contains the point ratio; a side that
    can resample to zero accepted leaves that end of the interval open."""
    from tailforge.bench.lowdensity import bin_costs

    cost = {"baseline": {"seconds": 10.0}, "guided": {"seconds": 10.0}}
    (always,) = bin_costs([0.0, 1.0], {"baseline": np.full(20, 0.5), "guided": np.full(20, 0.5)}, cost)
    assert always["ratio_seconds"] == 1.0 and always["ratio_seconds_interval"] == [1.0, 1.0]
    half = np.r_[np.full(50, 0.5), np.full(50, 5.0)]
    (some,) = bin_costs([0.0, 1.0], {"baseline": half, "guided": np.full(100, 0.5)}, cost)
    low, high = some["ratio_seconds_interval"]
    assert some["ratio_seconds"] == 2.0 and 1.5 < low < 2.0 < high < 2.7
    rare = np.r_[0.5, np.full(9, 5.0)]
    (one,) = bin_costs([0.0, 1.0], {"baseline": rare, "guided": np.full(10, 0.5)}, cost)
    assert one["ratio_seconds"] == 10.0 and one["ratio_seconds_interval"][1] is None
