"""Model folders, checkpoints and training resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tailforge.gen.core.errors import CheckpointError
from tailforge.gen.models.classifiers import create_classifier, load_classifier, save_classifier
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.train.config import DiffusionTrainConfig
from tailforge.train.diffusion import train_diffusion

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


class Interrupt(Exception):
    pass


def _interrupt(*args, **kwargs):
    raise Interrupt


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 6-step run every resumed one must equal."""
    return _six_steps(tmp_path_factory.mktemp("straight"))


def _six_steps(out, monkeypatch=None):
    """A 6-step run with checkpoints at 3 and 6; with `monkeypatch`, the run stops before it
    exports the model (a crash right after the last checkpoint)."""
    config = DiffusionTrainConfig(dataset="digits?n=64", steps=6, batch_size=16, checkpoint_every=3, warmup_steps=2)
    if monkeypatch is None:
        return train_diffusion(config, out, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr("tailforge.train.diffusion.save_diffusion_model", _interrupt)
        with pytest.raises(Interrupt):
            train_diffusion(config, out, progress=False)


def _same_tensors(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing", "no_state"])
def test_an_unreadable_newest_checkpoint_resumes_from_the_previous_one(straight, tmp_path, monkeypatch, caplog,
                                                                       damage):
    """A power cut can leave the newest step-N/ with an empty, truncated or missing file: resume
    skips it with a warning naming it and continues from the one before, to the same weights."""
    _six_steps(tmp_path / "cut", monkeypatch)
    newest = tmp_path / "cut/checkpoints/step-0000006"
    victim = newest / ("state.json" if damage == "no_state" else "ema.safetensors")
    if damage == "empty":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-7])
    else:
        victim.unlink()
    with caplog.at_level("WARNING", logger="tailforge.train.run_folder"):
        _six_steps(tmp_path / "cut")
    assert any("step-0000006" in r.getMessage() for r in caplog.records), caplog.text
    for name in ("unet/diffusion_pytorch_model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert _same_tensors(straight / "checkpoints/step-0000006" / name, newest / name), name
    assert _same_tensors(straight / WEIGHTS, tmp_path / "cut" / WEIGHTS)
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_no_readable_checkpoint_starts_over_with_a_warning(straight, tmp_path, monkeypatch, caplog):
    _six_steps(tmp_path / "cut", monkeypatch)
    for folder in (tmp_path / "cut/checkpoints").iterdir():
        (folder / "optimizer.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING", logger="tailforge.train.run_folder"):
        _six_steps(tmp_path / "cut")
    assert "no readable checkpoint" in caplog.text and "starts over" in caplog.text
    assert _same_tensors(straight / WEIGHTS, tmp_path / "cut" / WEIGHTS)


def test_checkpoint_files_then_folder_then_parent_are_fsynced(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    config = DiffusionTrainConfig(dataset="digits?n=16", steps=1, batch_size=8, checkpoint_every=1)
    out = train_diffusion(config, tmp_path, progress=False).resolve()
    checkpoints, folder = out / "checkpoints", out / "checkpoints/step-0000001"
    staging = next(Path(p) for p in synced if Path(p).parent == checkpoints and Path(p).name.startswith(".tmp-"))
    files = [p for p in folder.rglob("*") if p.is_file()]

    def last(path):
        return len(synced) - 1 - synced[::-1].index(str(path))

    file_syncs = [last(staging / p.relative_to(folder)) for p in files]
    assert len(file_syncs) == len(files)  # every file ...
    assert max(file_syncs) < last(staging) < last(checkpoints)  # ... then the folder, then after the rename its parent
    # the exported model: every file of its version, then the version, then the run folder
    version = (out / "unet").resolve().parent
    assert all(str(p) in synced for p in version.rglob("*") if p.is_file())
    assert last(version) < last(out)


def _tiny_unet(seed):
    from tailforge.gen.models.unet import build_unet

    torch.manual_seed(seed)
    return build_unet("tiny", image_size=8, channels=1, num_classes=10)


def test_a_model_export_killed_midway_leaves_the_previous_model_intact(tiny_model_dir, tmp_path, monkeypatch):
    """The model folder is published by one rename of a pointer: an export that dies while it
    writes (here: on its metadata) leaves the previous weights and metadata, loadable together."""
    from diffusers import DDPMScheduler

    from tailforge.gen.core.files import write_json_atomic
    from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model

    folder = tmp_path / "model"
    meta = ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789"), step=1)
    save_diffusion_model(folder, _tiny_unet(0), DDPMScheduler(), meta)
    (folder / "train_log.jsonl").write_text("{}\n")  # the run folder's other files stay as they are
    before = load_diffusion_model(folder)
    entries = sorted(p.name for p in folder.iterdir())

    def write_then_die(path, obj):
        if Path(path).name == "tailforge.json":
            raise Interrupt
        return write_json_atomic(path, obj)

    monkeypatch.setattr("tailforge.gen.models.diffusion.write_json_atomic", write_then_die)
    with pytest.raises(Interrupt):
        save_diffusion_model(folder, _tiny_unet(1), DDPMScheduler(), dataclasses.replace(meta, step=2))
    after = load_diffusion_model(folder)
    assert (after.model_hash, after.meta) == (before.model_hash, before.meta)
    assert sorted(p.name for p in folder.iterdir()) == entries
    assert len(list((folder / ".versions").iterdir())) == 2  # the pointer and one version: nothing left over
    monkeypatch.undo()
    save_diffusion_model(folder, _tiny_unet(1), DDPMScheduler(), dataclasses.replace(meta, step=2))
    assert load_diffusion_model(folder).meta.step == 2 and load_diffusion_model(folder).model_hash != before.model_hash
    save_diffusion_model(folder, _tiny_unet(2), DDPMScheduler(), dataclasses.replace(meta, step=3))
    # the pointer, the current version and the one before (a load that resolved it may still read it)
    assert len(list((folder / ".versions").iterdir())) == 3


def test_a_folder_written_before_versions_is_published_too(tiny_model_dir, tmp_path):
    """A model folder with real entries (an older export, or a copy) becomes a versioned one."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns(".versions"))
    assert not (folder / "unet").is_symlink()
    save_diffusion_model(folder, _tiny_unet(1), DDPMScheduler(), ModelMeta(image_size=8, channels=1, num_classes=10, step=5))
    assert (folder / "unet").is_symlink() and load_diffusion_model(folder).meta.step == 5


def test_a_classifier_export_killed_midway_leaves_the_previous_classifier_intact(tmp_path, monkeypatch):
    from tailforge.gen.core.files import save_module

    config = {"model": "tinycnn", "num_classes": 10, "in_chans": 1}
    torch.manual_seed(0)
    first = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    save_classifier(tmp_path / "clf", first, {**config, "test_accuracy": 0.5})

    def weights_then_die(*args, **kwargs):
        save_module(*args, **kwargs)
        raise Interrupt

    monkeypatch.setattr("tailforge.gen.models.classifiers.save_module", weights_then_die)
    with pytest.raises(Interrupt):
        save_classifier(tmp_path / "clf", create_classifier("tinycnn", num_classes=10, in_chans=1),
                        {**config, "test_accuracy": 0.9})
    loaded, saved = load_classifier(tmp_path / "clf")
    x = torch.randn(2, 1, 8, 8)
    assert saved["test_accuracy"] == 0.5 and torch.equal(loaded(x), first(x))


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    from tailforge.train.run_folder import open_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    with caplog.at_level("WARNING", logger="tailforge.train.run_folder"):
        open_log(log, lambda entry: entry["epoch"] <= 1).close()
    assert log.read_text() == '{"epoch": 1}\n' and "torn last line" in caplog.text and str(log) in caplog.text
    log.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(CheckpointError, match="line 2 is not JSON"):
        open_log(log)
