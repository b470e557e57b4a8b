"""Classifier training: schedules, loss, exact resume, the augmentation-stage contract, real +
synthetic mixes from shards, Ray Train, and the CIFAR ResNet-18 preset."""

from __future__ import annotations

import functools
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tailforge.gen.core.errors import CheckpointError, ConfigError
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.models.classifiers import create_classifier, load_classifier
from tailforge.train.classifier import classification_loss, lr_at, train_classifier
from tailforge.train.config import ClassifierTrainConfig, MixSource

SMALL = dict(dataset="digits?n=160", model="tinycnn", batch_size=32, loader_workers=0, shuffle_buffer=64)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_lr_schedules_by_hand():
    cosine = ClassifierTrainConfig(lr=1.0, warmup=0.1, schedule="cosine")
    assert lr_at(cosine, 0, 100, 10) == pytest.approx(0.1)  # warmup: (step + 1) / 10
    assert lr_at(cosine, 9, 100, 10) == pytest.approx(1.0)
    assert lr_at(cosine, 10, 100, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(cosine, 55, 100, 10) == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert lr_at(cosine, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = ClassifierTrainConfig(lr=1.0, warmup=0.0, schedule="step", step_epochs=2, gamma=0.1)
    assert [lr_at(step, s, 100, 10) for s in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_classification_loss_is_the_sum_over_halves():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (4,))
    assert classification_loss(logits[:4], labels) == pytest.approx(F.cross_entropy(logits[:4], labels).item())
    both = F.cross_entropy(logits[:4], labels, label_smoothing=0.1) + F.cross_entropy(logits[4:], labels, label_smoothing=0.1)
    assert classification_loss(logits, labels, 0.1) == pytest.approx(both.item())
    with pytest.raises(ConfigError):
        classification_loss(torch.randn(6, 5), labels)


class Interrupt(Exception):
    pass


def test_resumed_run_continues_with_the_same_optimizer_state(tmp_path):
    """A run interrupted after epoch 1 and re-run ends with exactly the weights and optimizer state
    of the uninterrupted run (a fresh optimizer would have different Adam moments and step counts)."""
    config = ClassifierTrainConfig(**SMALL, epochs=2)
    steps = math.ceil(160 / 32)
    train_classifier(config, tmp_path / "full", progress=False)

    def stop_after_one(entry):
        if entry["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_classifier(config, tmp_path / "cut", progress=False, report=stop_after_one)
    cut = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in cut.iterdir()) == ["epoch-0001"]
    saved = load_file(str(cut / "epoch-0001" / "optimizer.safetensors"))
    assert {int(v) for k, v in saved.items() if k.endswith(".step")} == {steps}
    _, accuracy = train_classifier(config, tmp_path / "cut", progress=False)

    for name in ("classifier.safetensors", "optimizer.safetensors"):
        full = load_file(str(tmp_path / "full" / "checkpoints" / "epoch-0002" / name))
        resumed = load_file(str(tmp_path / "cut" / "checkpoints" / "epoch-0002" / name))
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full), name
    assert [e["epoch"] for e in read_log(tmp_path / "cut")] == [1, 2]
    assert accuracy == json.loads((tmp_path / "full" / "classifier.json").read_text())["test_accuracy"]
    with pytest.raises(CheckpointError, match="lr"):
        train_classifier(ClassifierTrainConfig(**SMALL, epochs=2, lr=1e-3), tmp_path / "cut", progress=False)


def test_augmentation_stage_contract(tmp_path):
    """The trainer hands a stage float32 [-1, 1] CPU batches numbered 0, 1, ... with the run seed, and
    with the stage's "augmented" batch the loss is CE(model(images)) + CE(model(augmented))."""
    seen = []

    def flip_stage(batches):  # a known perturbation: augmented = the horizontally flipped batch
        for batch in batches:
            seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()})
            batch["augmented"] = batch["images"].flip(-1)
            yield batch

    # one step per epoch, so each epoch's logged loss is that step's loss
    config = ClassifierTrainConfig(**{**SMALL, "batch_size": 16}, epochs=3, epoch_samples=16, seed=5)
    train_classifier(config, tmp_path / "run", progress=False, stage=flip_stage)
    assert [b["index"] for b in seen] == [0, 1, 2] and {b["seed"] for b in seen} == {5}
    first = seen[0]
    assert first["images"].dtype == torch.float32 and first["images"].device.type == "cpu"
    assert first["images"].min() >= -1 and first["images"].max() <= 1 and first["images"].shape == (16, 1, 8, 8)
    # the first step's loss, from the model as initialised (same seed), in training mode
    torch.manual_seed(5)
    model = create_classifier("tinycnn", num_classes=10, in_chans=1).train()
    logits = model(torch.cat([first["images"], first["images"].flip(-1)]))
    expected = F.cross_entropy(logits[:16], first["labels"]) + F.cross_entropy(logits[16:], first["labels"])
    assert read_log(tmp_path / "run")[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_real_plus_synthetic_shards_end_to_end(tmp_path, tiny_model_dir):
    """A `gen baseline` shard set (random-weight model, 2 DDIM steps) mixed 1 : 0.5 with the real
    data; the log's observed mix and the per-epoch sample counts follow from the weights."""
    baseline = BaselineConfig(model=str(tiny_model_dir), num=40, sampling=SamplingConfig(sampler="ddim", steps=2),
                              shard_size=20)
    run_job(tmp_path / "baseline", config_dict(baseline), plan_shards("baseline", 40, 20, 0),
            functools.partial(BaselineSource, baseline), actors=0, progress=False,
            manifest_extra={"num_classes": 10})
    mix = (MixSource("real", 1.0), MixSource("baseline", 0.5, str(tmp_path / "baseline")))
    config = ClassifierTrainConfig(**SMALL, epochs=2, mix=mix)
    model, accuracy = train_classifier(config, tmp_path / "run", progress=False)
    log = read_log(tmp_path / "run")
    assert [e["samples"] for e in log] == [256, 256]  # ceil(160 * 1.5 / 32) = 8 steps of 32
    observed = sum(e["mix"]["baseline"] for e in log) / 2
    assert abs(observed - 1 / 3) < 0.12  # 512 draws: 4 standard deviations
    loaded, saved = load_classifier(tmp_path / "run")
    assert saved["train_config"]["mix"][1]["path"] == str(tmp_path / "baseline") and saved["test_accuracy"] == accuracy


def test_ray_train_two_workers(tmp_path, ray_session):
    """Two DDP ranks on the shared Ray instance: each takes half of every global batch, the
    per-epoch figures are summed over both, and rank 0 writes the classifier."""
    config = ClassifierTrainConfig(**{**SMALL, "dataset": "digits?n=64"}, epochs=1, workers=2)
    model, accuracy = train_classifier(config, tmp_path / "ray", progress=False)
    (entry,) = read_log(tmp_path / "ray")
    assert entry["world_size"] == 2 and entry["samples"] == 64 and entry["step"] == 2
    assert entry["test_accuracy"] == pytest.approx(accuracy)
    assert load_classifier(tmp_path / "ray")[1]["train_config"]["workers"] == 2


def test_resnet18_cifar_preset():
    assert timm.is_model("resnet18_cifar")
    model = create_classifier("resnet18_cifar", num_classes=10, in_chans=3).eval()
    features = model.forward_features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 512, 4, 4)  # stride-1 stem: 32 -> 4 (the ImageNet stem gives 1x1)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ConfigError):
        timm.create_model("resnet18_cifar", pretrained=True)


@pytest.mark.parametrize("argv, message", [
    (["--mix", "real=1,baseline"], "NAME=WEIGHT"),
    (["--mix", "real=1,baseline=0.3", "--shards", "baseline=/no/such/set"], "/no/such/set"),
    (["--follow", "--exact-epochs"], "resampled"),
    (["--batch-size", "33", "--workers", "2"], "multiple of workers"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    from tailforge.cli import main

    assert main(["train", "classifier", "--dataset", "digits?n=40", "--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
