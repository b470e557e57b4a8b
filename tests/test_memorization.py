"""Ratio criterion, exact chunked nearest neighbours and the memorization command."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from tailforge.cli import main
from tailforge.eval.emm import write_labeled_shards
from tailforge.eval.memorization import evaluate_memorization, memorization_stats, nearest_two, ratio_criterion
from tailforge.gen.data.datasets import load_dataset


def test_ratio_criterion_hand_built():
    # training points on a line and off it; queries at known distances
    train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    queries = torch.tensor([[0.1, 0.0],   # d1 = 0.1, d2 = 0.9: ratio 1/9 -> replicate
                            [0.3, 0.0],   # d1 = 0.3, d2 = 0.7: ratio 0.43 -> not
                            [0.25, 0.0],  # d1 = 0.25, d2 = 0.75: exactly 1/3 -> not (strict)
                            [1.0, 0.0]])  # a copy of training point 1: d1 = 0 -> replicate
    nn2 = nearest_two(queries, train, device="cpu")
    assert nn2.i1.tolist() == [0, 0, 0, 1] and nn2.i2.tolist() == [1, 1, 1, 0]
    assert nn2.d1.tolist() == pytest.approx([0.1, 0.3, 0.25, 0.0])
    assert nn2.d2.tolist() == pytest.approx([0.9, 0.7, 0.75, 1.0])
    assert ratio_criterion(nn2.d1, nn2.d2).tolist() == [True, False, False, True]


def test_nearest_two_matches_sklearn_when_chunked():
    gen = torch.Generator().manual_seed(0)
    train, queries = torch.rand(57, 3, 4, 4, generator=gen), torch.rand(23, 3, 4, 4, generator=gen)
    nn2 = nearest_two(queries, train, query_chunk=5, reference_chunk=7, device="cpu")
    dist, index = NearestNeighbors(n_neighbors=2).fit(train.flatten(1).numpy()).kneighbors(queries.flatten(1).numpy())
    assert nn2.i1.tolist() == index[:, 0].tolist() and nn2.i2.tolist() == index[:, 1].tolist()
    assert torch.allclose(nn2.d1, torch.from_numpy(dist[:, 0]), atol=1e-6)
    assert torch.allclose(nn2.d2, torch.from_numpy(dist[:, 1]), atol=1e-6)


def test_stats_count_distinct_replicated_training_images():
    train = load_dataset("digits?n=60")
    # three copies of image 0, one of image 5, two held-out test images
    test = load_dataset("digits", "test")
    generated = torch.cat([train.images[[0, 0, 0, 5]], test.images[:2]])
    labels = torch.cat([train.labels[[0, 0, 0, 5]], test.labels[:2]])
    stats, _ = memorization_stats(generated, labels, train, device="cpu")
    assert stats["replicates"] >= 4 and stats["distinct_train_images_replicated"] >= 2
    assert stats["memorization_ratio"] == pytest.approx(stats["replicates"] / 6)
    per_class = {c["class"]: c for c in stats["per_class"]}
    assert per_class[int(train.labels[0])]["memorization_ratio"] == 1.0
    assert sum(stats["ratio_histogram"]["counts"]) == 6


def test_copies_memorized_and_held_out_data_not(tmp_path):
    train = load_dataset("digits?n=200")
    test = load_dataset("digits", "test")
    copies = train.subset(range(50))
    report = evaluate_memorization(copies, train, tmp_path / "copies", device="cpu")
    assert report["memorization_ratio"] == 1.0 and report["distinct_train_images_replicated"] == 50
    held = dataclasses.replace(test.subset(range(100)))
    report = evaluate_memorization(held, train, tmp_path / "held", device="cpu")
    assert report["memorization_ratio"] < 0.1
    assert (tmp_path / "held" / "nearest_pairs.png").is_file()


def test_cli_on_shards_writes_memorization_ratio(tmp_path, capsys):
    train = load_dataset("digits?n=100")
    generated = train.subset(range(30))
    shards = tmp_path / "shards"
    write_labeled_shards(shards, generated, train.info.class_names, job="gen")
    out = tmp_path / "out"
    assert main(["eval", "memorization", "--shards", str(shards), "--dataset", "digits?n=100", "--out", str(out),
                 "--classifier", str(_classifier(tmp_path)), "--device", "cpu"]) == 0
    report = json.loads((out / "memorization.json").read_text())
    assert report["memorization_ratio"] == 1.0
    feature = report["feature_space"]
    # copies of training images sit at distance 0 from the training set; held-out images do not
    assert feature["generated_nn_distance"]["mean"] < 1e-4 < feature["heldout_nn_distance"]["mean"]
    assert json.loads(capsys.readouterr().out)["memorization_ratio"] == 1.0


def test_cli_needs_exactly_one_source(tmp_path, capsys):
    assert main(["eval", "memorization", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    assert "exactly one of --shards" in capsys.readouterr().err


def _classifier(tmp_path):
    from tailforge.gen.models.classifiers import create_classifier, save_classifier

    torch.manual_seed(0)
    net = create_classifier("tinycnn", num_classes=10, in_chans=1)
    save_classifier(tmp_path / "clf", net, {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    return tmp_path / "clf"
