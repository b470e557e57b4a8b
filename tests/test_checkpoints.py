"""Model folders, checkpoints and training resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tailforge.gen.core.errors import CheckpointError
from tailforge.gen.models.classifiers import create_classifier, load_classifier, save_classifier
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.train.diffusion import DiffusionTrainConfig, train_diffusion

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def test_model_folder_round_trip(tiny_model_dir):
    model = load_diffusion_model(tiny_model_dir)
    assert model.meta.num_classes == 10 and model.meta.image_size == 8 and len(model.model_hash) == 16
    x = torch.randn(2, 1, 8, 8)
    out = model.denoiser(x, torch.tensor([1.0, 5.0]), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the folder is also a diffusers DDPMPipeline
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert pipe.unet.config.num_class_embeds == 10


def test_plain_diffusers_folder_loads(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir / "unet", tmp_path / "unet")
    model = load_diffusion_model(tmp_path)  # no scheduler/, no tailforge.json: DDPM defaults
    assert model.meta.num_classes == 10 and model.meta.channels == 1
    assert model.denoiser.sigma_max == pytest.approx(157.4, rel=1e-2)  # linear schedule, T = 1000


@pytest.mark.parametrize("damage,message", [
    ("missing", "model folder does not exist"),
    ("no_unet", "not a diffusion model folder"),
    ("bin_only", "pickled weights are not loaded"),
    ("truncated", "cannot load the U-Net"),
    ("bad_meta", "not valid JSON"),
])
def test_bad_model_folders_give_clear_errors(tiny_model_dir, tmp_path, damage, message):
    folder = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(tiny_model_dir, folder)
    if damage == "no_unet":
        shutil.rmtree(folder / "unet")
    elif damage == "bin_only":
        (folder / WEIGHTS).rename(folder / "unet" / "diffusion_pytorch_model.bin")
    elif damage == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif damage == "bad_meta":
        (folder / "tailforge.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=message):
        load_diffusion_model(folder)


def test_classifier_round_trip_and_errors(tmp_path):
    model = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    save_classifier(tmp_path / "clf", model, {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    loaded, config = load_classifier(tmp_path / "clf")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.forward_head(loaded.forward_features(x), pre_logits=True).shape == (3, 64)
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps({"model": "tinycnn", "num_classes": 3, "in_chans": 1}))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nothing")


def test_resumed_training_equals_uninterrupted(tmp_path):
    """3 steps + resume to 6 gives the same weights and optimizer state as 6 steps straight."""
    base = dict(dataset="digits?n=64", steps=6, batch_size=16, checkpoint_every=3, warmup_steps=2)
    train_diffusion(DiffusionTrainConfig(**base), tmp_path / "straight", progress=False)
    train_diffusion(DiffusionTrainConfig(**{**base, "steps": 3}), tmp_path / "resumed", progress=False)
    train_diffusion(DiffusionTrainConfig(**base), tmp_path / "resumed", progress=False)
    for name in ("unet/diffusion_pytorch_model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "straight/checkpoints/step-0000006" / name))
        b = load_file(str(tmp_path / "resumed/checkpoints/step-0000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    exported = load_file(str(tmp_path / "resumed" / WEIGHTS))
    ema = load_file(str(tmp_path / "resumed/checkpoints/step-0000006/ema.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the exported model is the EMA
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_resume_with_a_different_config_is_refused(tmp_path):
    base = dict(dataset="digits?n=32", steps=2, batch_size=8, checkpoint_every=2)
    train_diffusion(DiffusionTrainConfig(**base), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train_diffusion(DiffusionTrainConfig(**{**base, "lr": 1e-4}), tmp_path, progress=False)


def test_label_dropout_trains_one_model_that_also_denoises_without_labels(tmp_path):
    """--label-dropout: an extra null-class embedding, recorded in the model folder; the loaded model
    denoises with labels (generation) and without them (the null class: DiffAug, DiffAug-Ensemble)."""
    from tailforge.gen.methods.diffaug import load_diffaug_ensemble

    config = DiffusionTrainConfig(dataset="digits?n=32", steps=2, batch_size=8, checkpoint_every=2, label_dropout=0.2)
    model = load_diffusion_model(train_diffusion(config, tmp_path, progress=False))
    assert model.meta.num_classes == 10 and model.meta.null_class == 10 and model.meta.denoises_without_labels
    unet = model.denoiser.eps_model.unet
    assert unet.config.num_class_embeds == 11
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 2.0)
    unlabeled = model.denoiser(x, sigma)
    assert torch.equal(unlabeled, model.denoiser(x, sigma, torch.full((4,), 10)))  # no labels = the null class
    assert not torch.equal(unlabeled, model.denoiser(x, sigma, torch.arange(4)))
    load_diffaug_ensemble(create_classifier("tinycnn", num_classes=10, in_chans=1), str(tmp_path))  # accepted


def test_drop_labels_draws_nothing_at_probability_zero():
    from tailforge.train.diffusion import drop_labels

    labels, gen = torch.arange(10).repeat(1000), torch.Generator().manual_seed(0)
    assert drop_labels(labels, 0.0, 10, gen) is labels
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=torch.Generator().manual_seed(0)))
    dropped = drop_labels(labels, 0.2, 10, torch.Generator().manual_seed(1))
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept]) and abs(float((~kept).float().mean()) - 0.2) < 0.02


@pytest.mark.parametrize("fields, message", [({"label_dropout": 1.0}, "label_dropout must be in"),
                                             ({"label_dropout": 0.1, "class_conditional": False}, "class-conditional")])
def test_bad_label_dropout_is_refused(tmp_path, fields, message):
    from tailforge.gen.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        train_diffusion(DiffusionTrainConfig(dataset="digits?n=8", steps=1, **fields), tmp_path, progress=False)
