"""--tensorboard: every number of every training-log entry is a TensorBoard scalar at the entry's step
(read back with TensorBoard's own EventAccumulator), for both writer packages, and a resumed run's
redone steps replace the interrupted run's instead of doubling them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tailforge.gen.core.errors import ConfigError
from tailforge.train import run_folder
from tailforge.train.config import DiffusionTrainConfig
from tailforge.train.run_folder import log_to_tensorboard

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

DATASET = "digits?n=64"


def log_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purges applied)."""
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def expected_scalars(entries: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the log's entries must give: every number but the step, nested dicts as field/key,
    as float32 (TensorBoard's scalar type)."""
    expected: dict[str, list[tuple[int, float]]] = {}

    def add(entry: dict, step: int, prefix: str = "") -> None:
        for name, value in entry.items():
            if isinstance(value, dict):
                add(value, step, f"{prefix}{name}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and prefix + name != "step":
                expected.setdefault(prefix + name, []).append((step, float(np.float32(value))))

    for entry in entries:
        add(entry, entry["step"])
    return expected


@pytest.fixture(params=["torch.utils.tensorboard", "tensorboardX"])
def writer_package(request, monkeypatch):
    monkeypatch.setattr(run_folder, "TENSORBOARD_WRITERS", (request.param,))
    return request.param


@pytest.mark.slow  # trains a model
def test_diffusion_scalars_equal_its_log_and_a_resumed_run_replaces_the_redone_steps(tmp_path, writer_package,
                                                                                  monkeypatch):
    from tailforge.train import diffusion

    config = DiffusionTrainConfig(dataset=DATASET, steps=6, batch_size=8, warmup_steps=3, checkpoint_every=4)
    save_checkpoint = diffusion._save_checkpoint

    def crash_at_step_6(checkpoints, step, *args):  # after step 6 is logged, before it is checkpointed
        if step == 6:
            raise KeyboardInterrupt
        save_checkpoint(checkpoints, step, *args)

    monkeypatch.setattr(diffusion, "_save_checkpoint", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt), log_to_tensorboard(tmp_path / "tb"):
        diffusion.train_diffusion(config, tmp_path / "model", progress=False, log_every=2)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tb")["loss"]] == [2, 4, 6]
    monkeypatch.setattr(diffusion, "_save_checkpoint", save_checkpoint)
    with log_to_tensorboard(tmp_path / "tb"):
        diffusion.train_diffusion(config, tmp_path / "model", progress=False, log_every=2)  # resumes from step 4
    entries = log_entries(tmp_path / "model" / "train_log.jsonl")
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert {"loss", "lr", "samples_per_second"} <= set(entries[0])
    assert tensorboard_scalars(tmp_path / "tb") == expected_scalars(entries)


@pytest.mark.slow  # trains a model
def test_classifier_cli_scalars_equal_its_log(tmp_path, writer_package):
    from tailforge.cli import main

    out, board = tmp_path / "clf", tmp_path / "tb"
    assert main(["train", "classifier", "--dataset", DATASET, "--epochs", "2", "--batch-size", "16",
                 "--loader-workers", "0", "--quiet", "--out", str(out), "--tensorboard", str(board)]) == 0
    entries = log_entries(out / "train_log.jsonl")
    scalars = tensorboard_scalars(board)
    assert {"train_loss", "train_accuracy", "test_accuracy", "lr", "samples_per_second", "mix/real"} <= set(scalars)
    assert scalars == expected_scalars(entries)


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("input", ["x0", "xt"])
def test_guidance_nets_are_two_runs_equal_to_their_logs(tmp_path, tiny_model_dir, input):
    from tailforge.gen.diffusion.config import SamplingConfig
    from tailforge.train.config import GuidanceTrainConfig
    from tailforge.train.guidance import train_guidance

    config = GuidanceTrainConfig(dataset="digits?n=60", model=str(tiny_model_dir), input=input, epochs=2, levels=2,
                                 batch_size=32, synthetic=SamplingConfig(sampler="ddim", steps=2))
    with log_to_tensorboard(tmp_path / "tb"):
        train_guidance(config, tmp_path / "g", progress=False)
    for net in ("classifier", "discriminator"):
        entries = log_entries(tmp_path / "g" / f"{net}_log.jsonl")
        assert [e["epoch"] for e in entries] == [1, 2] and {"train_loss", "lr", "samples_per_second"} <= set(entries[0])
        assert tensorboard_scalars(tmp_path / "tb" / net) == expected_scalars(entries)


def test_without_a_writer_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "TENSORBOARD_WRITERS", ("tailforge_no_such_writer",))
    message = r"tensorboard or tensorboardX package: pip install 'tailforge\[tensorboard\]'"
    with pytest.raises(ConfigError, match=message):
        with log_to_tensorboard(tmp_path / "tb"):
            pass
    assert not (tmp_path / "tb").exists()
    with log_to_tensorboard(None):  # no --tensorboard: nothing is needed
        assert run_folder.tensorboard_folder() is None
