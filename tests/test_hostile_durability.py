"""The hostile-input table, durability: the states a power cut, a killed export or a hand edit
leaves in training run folders and model folders (tests/hostile.py is the harness). Each case
builds that state from an undisturbed run, runs the real command (`tailforge train diffusion`,
`train classifier`, `gen baseline`) in this process, checks the promised outcome, that the
result equals the undisturbed run's, and that nothing outside the command's own folder changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
from hostile import Hostile, assert_untouched, check_outcome, run_command, snapshot

CASES = [
    Hostile("empty file in the newest diffusion checkpoint", "durability", "accept"),
    Hostile("truncated weights in the newest diffusion checkpoint", "durability", "accept"),
    Hostile("newest diffusion checkpoint without state.json", "durability", "accept"),
    Hostile("newest diffusion checkpoint with a file missing", "durability", "accept"),
    Hostile("every diffusion checkpoint unreadable", "durability", "accept"),
    Hostile("checkpoint staging folder left behind", "durability", "accept"),
    Hostile("foreign file in a checkpoint folder", "durability", "accept"),
    Hostile("checkpoint state.json with a malformed file list", "durability", "accept"),
    Hostile("torn last line in a diffusion train_log.jsonl", "durability", "accept"),
    Hostile("model export killed midway", "durability", "accept"),
    Hostile("empty file in the newest classifier checkpoint", "durability", "accept"),
    Hostile("torn last line in a classifier train_log.jsonl", "durability", "accept"),
    Hostile("malformed line inside train_log.jsonl", "durability", "error",
            r"train_log\.jsonl line 1 is not JSON.*repair or remove the log"),
    Hostile("half-exported model folder given to gen", "durability", "accept"),
    Hostile("model folder with weights but no tailforge.json", "durability", "accept"),
    Hostile("published model folder whose version lost tailforge.json", "durability", "error",
            r"model .* without tailforge\.json in its current version .*export the model again"),
    Hostile("model folder whose version pointer dangles", "durability", "error",
            r"is not a diffusion model folder"),
    Hostile("model re-exported while a job loads it", "concurrency", "accept"),
]

DIFFUSION = ["train", "diffusion", "--dataset", "digits?n=32", "--steps", "2", "--batch-size", "8",
             "--checkpoint-every", "1", "--quiet"]
CLASSIFIER = ["train", "classifier", "--dataset", "digits?n=64", "--model", "tinycnn", "--batch-size", "16",
              "--loader-workers", "0", "--shuffle-buffer", "32", "--epochs", "2", "--quiet"]
GEN = ["gen", "baseline", "--num", "4", "--shard-size", "2", "--batch-size", "2", "--sampler", "ddim", "--steps", "2",
       "--actors", "0", "--quiet"]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
MODEL_ENTRIES = ("unet", "scheduler", "model_index.json", "tailforge.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shards(out: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(out.glob("*.tar"))}


@dataclasses.dataclass
class Runs:
    """Undisturbed runs each case starts from and must end equal to."""

    diffusion: Path  # a finished 2-step diffusion run (checkpoints step-1, step-2, the exported model)
    classifier: Path  # a finished 2-epoch classifier run (checkpoints epoch-1, epoch-2, the classifier)
    shards: dict[str, str]  # sha256 of each shard of `gen baseline` on the diffusion run's model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("undisturbed")
    for argv, out in ((DIFFUSION, root / "diffusion"), (CLASSIFIER, root / "classifier"),
                      (GEN + ["--model", str(root / "diffusion")], root / "shards")):
        outcome = run_command([*argv, "--out", str(out)])
        assert outcome.code == 0, outcome.stderr[-2000:]
    return Runs(root / "diffusion", root / "classifier", shards(root / "shards"))


@dataclasses.dataclass
class World:
    root: Path  # everything a case may see; only `out` may change
    out: Path  # the command's --out (or the model folder a gen case reads, which must not change)
    runs: Runs

    def copy(self, run: Path) -> Path:
        shutil.copytree(run, self.out, symlinks=True)
        return self.out


@pytest.fixture
def world(tmp_path, runs):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("a user's file next to the run")
    return World(tmp_path, tmp_path / "run", runs)


def crash_before_export(out: Path, entries: tuple[str, ...]) -> None:
    """What a trainer killed after its last checkpoint leaves: no exported model."""
    for name in entries:
        (out / name).unlink()
    shutil.rmtree(out / ".versions")


def retrain(case: Hostile, world: World, argv: list[str], damage: Callable[[Path], None]) -> None:
    """Damage a copy of the run (its exported model removed, as by a crash before export), re-run
    the training command: the promised outcome, nothing outside the run changed, and (accepted)
    the exported weights equal the undisturbed run's and every log line is whole JSON."""
    run = world.runs.diffusion if argv is DIFFUSION else world.runs.classifier
    out = world.copy(run)
    crash_before_export(out, MODEL_ENTRIES if argv is DIFFUSION else ("classifier.safetensors", "classifier.json"))
    damage(out)
    before = snapshot(world.root, [out])
    check_outcome(case, run_command([*argv, "--out", str(out)]))
    assert_untouched(before, snapshot(world.root, [out]), case)
    if case.expect == "accept":
        weights = UNET_WEIGHTS if argv is DIFFUSION else "classifier.safetensors"
        assert sha256(out / weights) == sha256(run / weights), f"{case.name}: not the undisturbed run's weights"
        [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]  # every line whole


def generate(case: Hostile, world: World, model: Path, same_model: bool = True) -> None:
    """`gen baseline --model MODEL`: the promised outcome, the model folder and everything else
    untouched, and (accepted) the undisturbed run's shards (exactly, for `same_model`)."""
    out = world.root / "shards"
    before = snapshot(world.root, [out])
    check_outcome(case, run_command([*GEN, "--model", str(model), "--out", str(out)]))
    assert_untouched(before, snapshot(world.root, [out]), case)
    if case.expect == "accept":
        assert shards(out).keys() == world.runs.shards.keys()
        assert not same_model or shards(out) == world.runs.shards, f"{case.name}: not the undisturbed run's shards"


def newest(out: Path) -> Path:
    return sorted((out / "checkpoints").iterdir())[-1]


def empty(path: Path) -> None:
    path.write_bytes(b"")


def add_torn_line(out: Path) -> None:
    with open(out / "train_log.jsonl", "a") as log:
        log.write('{"epoch": 2, "step": 8, "train_lo')


def write_by_hand(out: Path, checkpoint: str, name: str, data: bytes) -> None:
    (out / "checkpoints" / checkpoint / name).write_bytes(data)


DAMAGE: dict[str, tuple[list[str], Callable[[Path], None]]] = {
    "empty file in the newest diffusion checkpoint": (DIFFUSION, lambda out: empty(newest(out) / "ema.safetensors")),
    "truncated weights in the newest diffusion checkpoint": (DIFFUSION, lambda out: (
        newest(out) / UNET_WEIGHTS).write_bytes((newest(out) / UNET_WEIGHTS).read_bytes()[:100])),
    "newest diffusion checkpoint without state.json": (DIFFUSION, lambda out: (newest(out) / "state.json").unlink()),
    "newest diffusion checkpoint with a file missing": (
        DIFFUSION, lambda out: (newest(out) / "optimizer.safetensors").unlink()),
    "every diffusion checkpoint unreadable": (DIFFUSION, lambda out: [
        empty(folder / "optimizer.json") for folder in (out / "checkpoints").iterdir()]),
    "checkpoint staging folder left behind": (DIFFUSION, lambda out: [
        (out / "checkpoints" / ".tmp-k1ll3d").mkdir(), empty(out / "checkpoints" / ".tmp-k1ll3d" / "ema.safetensors")]),
    "foreign file in a checkpoint folder": (DIFFUSION, lambda out: (newest(out) / "notes.txt").write_text("mine")),
    "checkpoint state.json with a malformed file list": (DIFFUSION, lambda out: (newest(out) / "state.json").write_text(
        json.dumps({**json.loads((newest(out) / "state.json").read_text()), "files": {"ema.safetensors": 3}}))),
    "torn last line in a diffusion train_log.jsonl": (DIFFUSION, add_torn_line),
    "empty file in the newest classifier checkpoint": (
        CLASSIFIER, lambda out: empty(newest(out) / "classifier.safetensors")),
    "torn last line in a classifier train_log.jsonl": (
        CLASSIFIER, lambda out: [shutil.rmtree(newest(out)), add_torn_line(out)]),
    "malformed line inside train_log.jsonl": (CLASSIFIER, lambda out: (out / "train_log.jsonl").write_text(
        "not json\n" + (out / "train_log.jsonl").read_text())),
}


def killed_export(case: Hostile, world: World) -> None:
    """A re-export killed while it wrote its version (a partial v-*/ beside the current one), then
    training re-run: the model loads as the previous one throughout, and the re-run exports it."""
    out = world.copy(world.runs.diffusion)
    partial = out / ".versions" / "v-k1ll3d"
    shutil.copytree(out / ".versions" / "current" / "unet", partial / "unet")
    empty(partial / UNET_WEIGHTS)
    generate(dataclasses.replace(case, name=f"{case.name}: gen"), world, out)
    before = snapshot(world.root, [out])
    check_outcome(case, run_command([*DIFFUSION, "--out", str(out)]))
    assert_untouched(before, snapshot(world.root, [out]), case)
    assert sha256(out / UNET_WEIGHTS) == sha256(world.runs.diffusion / UNET_WEIGHTS)


def half_exported_model(case: Hostile, world: World) -> None:
    model = world.copy(world.runs.diffusion)
    partial = model / ".versions" / "v-h4lf"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "config.json").write_text("{")
    generate(case, world, model)


def plain_model_folder(case: Hostile, world: World) -> None:
    """A folder with the U-Net and scheduler but no tailforge.json loads as a diffusers folder
    (its metadata read off the U-Net: the samples record other class names and dataset)."""
    model = world.out
    model.mkdir()
    for name in ("unet", "scheduler"):
        shutil.copytree(world.runs.diffusion / name, model / name)
    generate(case, world, model, same_model=False)


def version_lost_its_metadata(case: Hostile, world: World) -> None:
    model = world.copy(world.runs.diffusion)
    (model / ".versions" / "current" / "tailforge.json").unlink()
    generate(case, world, model)


def dangling_pointer(case: Hostile, world: World) -> None:
    model = world.copy(world.runs.diffusion)
    shutil.rmtree((model / ".versions" / "current").resolve())
    generate(case, world, model)


def reexported_while_loading(case: Hostile, world: World) -> None:
    """The same model is exported again and again (by a thread here) while the job loads it: every
    load sees one complete version, so the shards are the undisturbed run's."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import load_diffusion_model, save_diffusion_model

    model = world.copy(world.runs.diffusion)
    loaded = load_diffusion_model(model)
    unet, meta = loaded.denoiser.eps_model.unet, loaded.meta
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    stop = threading.Event()

    def export_again():
        while not stop.is_set():
            save_diffusion_model(model, unet, scheduler, meta)

    exporter = threading.Thread(target=export_again)
    exporter.start()
    try:
        out = world.root / "shards"
        check_outcome(case, run_command([*GEN, "--model", str(model), "--out", str(out)]))
    finally:
        stop.set()
        exporter.join()
    assert shards(out) == world.runs.shards


SCENARIOS: dict[str, Callable[[Hostile, World], None]] = {
    "model export killed midway": killed_export,
    "half-exported model folder given to gen": half_exported_model,
    "model folder with weights but no tailforge.json": plain_model_folder,
    "published model folder whose version lost tailforge.json": version_lost_its_metadata,
    "model folder whose version pointer dangles": dangling_pointer,
    "model re-exported while a job loads it": reexported_while_loading,
}


def test_every_case_has_a_scenario():
    assert sorted(c.name for c in CASES) == sorted([*DAMAGE, *SCENARIOS])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(case, world):
    if case.name in DAMAGE:
        retrain(case, world, *DAMAGE[case.name])
    else:
        SCENARIOS[case.name](case, world)
