"""The hostile-input table, jobs and folders: what a careless user or an adversary does to a
generation job's --out folder, its model and guidance folders and its options (tests/hostile.py
is the harness). Every case runs `tailforge gen ...` in this process against a tiny random-weight
model, checks the promised outcome and that nothing outside the job's own files changed.

Read-only storage, a denied permission and a full disk are simulated by making the file system
calls that write under one folder fail with that errno (the tests run as root, for whom chmod
denies nothing).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
import webdataset as wds
from hostile import Hostile, assert_untouched, check_outcome, run_command, snapshot

from tailforge.gen.core.errors import NonFiniteError
from tailforge.gen.core.files import write_json_atomic
from tailforge.gen.data.shards.verify import verify_shard_set
from tailforge.gen.data.storage import Storage

NUM, SHARD = 6, 3  # two shards of three samples
SHARDS = ("baseline-000000.tar", "baseline-000001.tar")

CASES = [
    Hostile("foreign non-empty folder", "data-loss", "error", r"is not empty and holds no _job\.json.*--force"),
    Hostile("foreign _info.json", "data-loss", "error", r"is not empty and holds no _job\.json \(_info\.json\)"),
    Hostile("user file with a shard's name, --force", "data-loss", "error",
            r"baseline-000000\.tar exists and is not this job's"),
    Hostile("user _info.json with --force", "data-loss", "error", r"_info\.json exists and is not this job's"),
    Hostile("another job's _job.json, --force", "data-loss", "error", r"already holds a different job.*num"),
    Hostile("--force adopts a folder of other files", "data-loss", "accept"),
    Hostile("user .x.tmp files in the job folder are kept", "data-loss", "accept"),
    Hostile("re-run of a finished job rewrites nothing", "data-loss", "accept"),
    Hostile("--out is a file", "data-loss", "error", r"exists and is not a folder"),
    Hostile("second driver while the first runs", "concurrency", "error",
            r"is locked by PID \d+ on .* \(started .*\)"),
    Hostile("lock held by another process", "concurrency", "error", r"is locked by PID 4242 on otherhost"),
    Hostile("stale lock of a dead driver", "concurrency", "accept"),
    Hostile("model replaced between crash and resume", "silent-wrong-data", "error",
            r"the model .* changed since the job .* started.*new --out"),
    Hostile("guidance replaced between crash and resume", "silent-wrong-data", "error",
            r"the guidance .* changed since the job .* started.*new --out"),
    Hostile("shard edited in place at the same size is redone", "silent-wrong-data", "accept"),
    Hostile("shard swapped for another of the same size is redone", "silent-wrong-data", "accept"),
    Hostile("disk full while writing a shard", "traceback", "error",
            r"baseline-000001\.tar: No space left on device \(kept: 1 of 2 shards, recorded in .*re-run"),
    Hostile("permission denied on --out", "traceback", "error", r"new-out: Permission denied \(kept: 0 of 2 shards"),
    Hostile("read-only finished folder re-run", "traceback", "accept"),
    Hostile("read-only unfinished folder", "traceback", "error", r": Read-only file system \(kept: 1 of 2 shards"),
    Hostile("--out below a file", "traceback", "error", r"Not a directory"),
    Hostile("_job.json is not JSON", "unclear-error", "error", r"job file .*_job\.json is not valid JSON"),
    Hostile("--eta nan", "unclear-error", "error", r"argument --eta: expected a finite number, got 'nan'"),
    Hostile("--eta inf", "unclear-error", "error", r"argument --eta: expected a finite number, got 'inf'"),
    Hostile("--alpha inf", "unclear-error", "error", r"argument --alpha: expected a finite number, got 'inf'"),
    Hostile("--tau nan", "unclear-error", "error", r"argument --tau: expected a finite number, got 'nan'"),
    Hostile("--beta -1", "unclear-error", "error", r"alpha and beta must be >= 0.*beta=-1"),
    Hostile("--num 0", "unclear-error", "error", r"argument --num: expected a positive integer, got 0"),
    Hostile("--num -3", "unclear-error", "error", r"argument --num: expected a positive integer, got -3"),
    Hostile("--shard-size 0", "unclear-error", "error", r"argument --shard-size: expected a positive integer"),
    Hostile("--batch-size -1", "unclear-error", "error", r"argument --batch-size: expected a positive integer"),
    Hostile("--steps 0", "unclear-error", "error", r"argument --steps: expected a positive integer, got 0"),
    Hostile("--seed -1", "unclear-error", "error", r"argument --seed: expected an integer >= 0, got -1"),
    Hostile("--actors -1", "unclear-error", "error", r"argument --actors: expected an integer >= 0, got -1"),
]


# ------------------------------------------------------------------------------------------------
# the world a case runs in


@dataclasses.dataclass
class World:
    root: Path  # everything the case may see; only `out` may change (and only where the case allows)
    model: Path  # the model folder (a copy of the tiny model, so a case may replace it)
    out: Path  # the job's --out
    reference: dict[str, str]  # sha256 of each shard of an undisturbed run of the same job

    def argv(self, *extra: str, command: str = "baseline", out: Path | None = None) -> list[str]:
        return ["gen", command, "--model", str(self.model), "--num", str(NUM), "--shard-size", str(SHARD),
                "--batch-size", str(SHARD), "--sampler", "ddim", "--steps", "2", "--actors", "0", "--quiet",
                "--out", str(out or self.out), *extra]

    def run(self, *extra: str, **kwargs):
        return run_command(self.argv(*extra, **kwargs))

    def snapshot(self, *exclude: Path) -> dict[str, tuple[int, str]]:
        return snapshot(self.root, exclude)

    def finished(self, out: Path | None = None) -> None:
        """`out` holds exactly the undisturbed run's shards and verifies."""
        out = out or self.out
        assert {name: sha256(out / name) for name in SHARDS} == self.reference
        report = verify_shard_set(out)
        assert report["ok"] and report["samples"] == NUM, report["problems"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("reference") / "model"
    shutil.copytree(tiny_model_dir, model, symlinks=True)
    world = World(model.parent, model, model.parent / "out", {})
    outcome = world.run()
    assert outcome.code == 0, outcome.stderr
    return {name: sha256(world.out / name) for name in SHARDS}


@pytest.fixture
def world(tiny_model_dir, tmp_path, reference):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, symlinks=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("a user's file next to the job")
    return World(tmp_path, model, tmp_path / "out", reference)


def crash_after_first_shard(out: Path) -> None:
    """What a driver killed after recording shard 0 leaves: no manifest, no shard 1 or its record."""
    for name in ("_info.json", SHARDS[1], f"_records/{Path(SHARDS[1]).stem}.json"):
        (out / name).unlink()


def deny_writes(monkeypatch, folder: Path, code: int) -> None:
    """Every call that would create, change or remove something under `folder` fails with `code`
    (EROFS: read-only storage; EACCES: no permission)."""
    folder = os.path.abspath(folder)

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and (
            os.path.abspath(path) + os.sep).startswith(folder + os.sep)

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def guard(call: Callable, writes: Callable[..., bool]) -> Callable:
        def guarded(*args, **kwargs):
            if writes(*args, **kwargs):
                refuse(args[0])
            return call(*args, **kwargs)
        return guarded

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(os, "open", guard(os.open, lambda path, flags, *a, **k: inside(path) and flags & write_flags))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, lambda path, mode="r", *a, **k: inside(path) and any(
        c in mode for c in "wax+")))
    for name in ("mkdir", "remove", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), lambda path, *a, **k: inside(path)))
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), lambda src, dst, *a, **k: inside(src) or inside(dst)))


# ------------------------------------------------------------------------------------------------
# the scenarios: each runs its case and checks what else must hold

SCENARIOS: dict[str, Callable] = {}


def scenario(name: str):
    def register(run: Callable) -> Callable:
        SCENARIOS[name] = run
        return run
    return register


def refused_untouched(case: Hostile, world: World, *extra: str, command: str = "baseline") -> None:
    """The case is refused and nothing anywhere (its --out included) changed."""
    before = world.snapshot()
    check_outcome(case, world.run(*extra, command=command))
    assert_untouched(before, world.snapshot(), case)


@scenario("foreign non-empty folder")
def _(case, world):
    (world.out / "photos").mkdir(parents=True)
    (world.out / "photos" / "cat.png").write_bytes(b"not ours")
    (world.out / ".draft.tmp").write_bytes(b"a user's temporary")
    (world.out / "_records").mkdir()
    (world.out / "_records" / ".x.tmp").write_bytes(b"also not ours")
    refused_untouched(case, world)


@scenario("foreign _info.json")
def _(case, world):
    world.out.mkdir()
    (world.out / "_info.json").write_text('{"splits": {"train": {"filenames": ["mine.tar"]}}}')
    refused_untouched(case, world)


@scenario("user file with a shard's name, --force")
def _(case, world):
    world.out.mkdir()
    (world.out / SHARDS[0]).write_bytes(b"a user's archive")
    refused_untouched(case, world, "--force")


@scenario("user _info.json with --force")
def _(case, world):
    world.out.mkdir()
    (world.out / "_info.json").write_text("{}")
    refused_untouched(case, world, "--force")


@scenario("another job's _job.json, --force")
def _(case, world):
    assert world.run(out=world.out).code == 0
    (world.out / "_info.json").unlink()  # so a rewrite would show
    argv = world.argv("--force")
    argv[argv.index("--num") + 1] = "9"
    before = world.snapshot()
    check_outcome(case, run_command(argv))
    assert_untouched(before, world.snapshot(), case)


@scenario("--force adopts a folder of other files")
def _(case, world):
    (world.out / "sub").mkdir(parents=True)
    (world.out / "notes.txt").write_text("keep me")
    (world.out / ".x.tmp").write_bytes(b"a user's temporary")
    (world.out / "sub" / ".baseline-000000.tar.0123abcd.tmp").write_bytes(b"not in the job's folder")
    before = world.snapshot()
    check_outcome(case, world.run("--force"))
    after = world.snapshot()
    assert {k: v for k, v in after.items() if k in before} == before  # every file that was there, as it was
    world.finished()
    assert world.run().code == 0  # from now on the folder is the job's own


@scenario("user .x.tmp files in the job folder are kept")
def _(case, world):
    assert world.run().code == 0
    crash_after_first_shard(world.out)
    users = [world.out / ".x.tmp", world.out / "_records" / ".notes.tmp", world.out / ".baseline-000001.tar.tmp",
             world.out / ".other-000001.tar.0123abcd.tmp"]
    for path in users:
        path.write_bytes(b"a user's file")
    ours = [world.out / ".baseline-000001.tar.0123abcd.tmp", world.out / "_records" / ".baseline-000001.json.9f.tmp"]
    for path in ours:
        path.write_bytes(b"left by a crashed writer")
    before = world.snapshot(world.out)
    check_outcome(case, world.run())
    assert_untouched(before, world.snapshot(world.out), case)
    assert all(p.read_bytes() == b"a user's file" for p in users) and not any(p.exists() for p in ours)
    world.finished()


@scenario("re-run of a finished job rewrites nothing")
def _(case, world):
    assert world.run().code == 0
    before = world.snapshot()
    mtimes = {p: p.stat().st_mtime_ns for p in world.out.rglob("*")}
    check_outcome(case, world.run())
    assert_untouched(before, world.snapshot(), case)
    assert {p: p.stat().st_mtime_ns for p in world.out.rglob("*")} == mtimes


@scenario("--out is a file")
def _(case, world):
    world.out.write_bytes(b"a user's file")
    refused_untouched(case, world)


@scenario("second driver while the first runs")
def _(case, world):
    from tailforge.cli import build_parser
    from tailforge.cli.flags import config_from_args
    from tailforge.gen.jobs.config import BaselineConfig
    from tailforge.gen.jobs.runner import model_manifest, run_config_job
    from tailforge.gen.jobs.sources import BaselineSource

    second_refused, first_waits = threading.Event(), threading.Event()

    class PausingSource(BaselineSource):  # the first driver, stopped in the middle of its second shard
        def samples(self, spec):
            if spec.index == 1:
                first_waits.set()
                assert second_refused.wait(120)
            yield from super().samples(spec)

    config = config_from_args(BaselineConfig, build_parser().parse_args(world.argv()))
    failures = []

    def first_driver():
        try:
            run_config_job(world.out, config, PausingSource, config.num, actors=0, progress=False,
                           manifest_extra=model_manifest(config.model))
        except BaseException as err:  # reported by the main thread
            failures.append(err)
            first_waits.set()

    thread = threading.Thread(target=first_driver)
    thread.start()
    try:
        assert first_waits.wait(120) and not failures, failures
        before = world.snapshot()
        check_outcome(case, world.run())
        assert_untouched(before, world.snapshot(), case)
    finally:
        second_refused.set()
        thread.join(120)
    assert not failures and not thread.is_alive(), failures
    world.finished()
    assert not (world.out / ".lock").exists()


@scenario("lock held by another process")
def _(case, world):
    world.out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'PID 4242 on otherhost (started 2026-01-01 00:00:00 UTC)')\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n", str(world.out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused_untouched(case, world)
    finally:
        holder.kill()
        holder.wait()
    assert world.run().code == 0  # once the holder is gone
    world.finished()


@scenario("stale lock of a dead driver")
def _(case, world):
    world.out.mkdir()
    (world.out / ".lock").write_text("PID 999999 on ghost (started 2026-01-01 00:00:00 UTC)")
    before = world.snapshot(world.out)
    check_outcome(case, world.run())
    assert_untouched(before, world.snapshot(world.out), case)
    world.finished()


def replace_model(folder: Path) -> None:
    """Train-free stand-in for a retrained model: new random weights in the same folder."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import load_diffusion_model, save_diffusion_model
    from tailforge.gen.models.unet import build_unet

    meta = load_diffusion_model(folder).meta
    torch.manual_seed(1)
    save_diffusion_model(folder, build_unet("tiny", image_size=8, channels=1, num_classes=10),
                         DDPMScheduler(num_train_timesteps=1000), meta)


@scenario("model replaced between crash and resume")
def _(case, world):
    assert world.run().code == 0
    crash_after_first_shard(world.out)
    replace_model(world.model)
    refused_untouched(case, world)


def save_random_guidance(folder: Path, seed: int) -> None:
    from test_guidance import make_net

    from tailforge.gen.models.guidance import save_guidance

    levels = torch.zeros(1)
    save_guidance(folder, make_net("x0", 10, levels, seed), {"model": "tinycnn", "num_classes": 10, "in_chans": 1},
                  make_net("x0", 2, levels, seed + 1), {"model": "tinycnn", "num_classes": 2, "in_chans": 1}, {})


@scenario("guidance replaced between crash and resume")
def _(case, world):
    guidance = world.root / "guidance"
    save_random_guidance(guidance, 0)
    extra = ("--guidance", str(guidance))
    assert world.run(*extra, command="lowdensity").code == 0
    for name in ("_info.json", "lowdensity-000001.tar", "_records/lowdensity-000001.json"):
        (world.out / name).unlink()
    save_random_guidance(guidance, 5)
    refused_untouched(case, world, *extra, command="lowdensity")


def redone_after(case, world, damage: Callable[[Path], None]) -> None:
    assert world.run().code == 0
    damage(world.out)
    before = world.snapshot(world.out)
    check_outcome(case, world.run())
    assert_untouched(before, world.snapshot(world.out), case)
    world.finished()


@scenario("shard edited in place at the same size is redone")
def _(case, world):
    def flip_a_byte(out: Path) -> None:
        path = out / SHARDS[0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    redone_after(case, world, flip_a_byte)


@scenario("shard swapped for another of the same size is redone")
def _(case, world):
    def swap(out: Path) -> None:
        first, second = (out / name for name in SHARDS)
        assert first.stat().st_size == second.stat().st_size  # same count: tar sizes are block multiples
        shutil.copyfile(second, first)

    redone_after(case, world, swap)


@scenario("disk full while writing a shard")
def _(case, world, monkeypatch):
    original, written = wds.TarWriter.write, []

    def fill_up(self, sample):
        if len(written) == SHARD:  # the first sample of the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(sample)
        return original(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", fill_up)
    before = world.snapshot(world.out)
    check_outcome(case, world.run())
    assert_untouched(before, world.snapshot(world.out), case)
    assert not list(world.out.glob(".*.tmp")) and (world.out / SHARDS[0]).is_file()
    monkeypatch.setattr(wds.TarWriter, "write", original)
    assert world.run().code == 0  # space again: the job completes from what it kept
    world.finished()


@scenario("permission denied on --out")
def _(case, world, monkeypatch):
    parent = world.root / "locked-down"
    parent.mkdir()
    deny_writes(monkeypatch, parent, errno.EACCES)
    before = world.snapshot()
    check_outcome(case, world.run(out=parent / "new-out"))
    monkeypatch.undo()
    assert_untouched(before, world.snapshot(), case)


@scenario("read-only finished folder re-run")
def _(case, world, monkeypatch):
    assert world.run().code == 0
    before = world.snapshot()
    deny_writes(monkeypatch, world.out, errno.EROFS)
    outcome = world.run()
    monkeypatch.undo()
    check_outcome(case, outcome)
    assert_untouched(before, world.snapshot(), case)
    assert '"shards": 2' in outcome.stdout


@scenario("read-only unfinished folder")
def _(case, world, monkeypatch):
    assert world.run().code == 0
    crash_after_first_shard(world.out)
    before = world.snapshot()
    deny_writes(monkeypatch, world.out, errno.EROFS)
    outcome = world.run()
    monkeypatch.undo()
    check_outcome(case, outcome)
    assert_untouched(before, world.snapshot(), case)


@scenario("--out below a file")
def _(case, world):
    (world.root / "a-file").write_bytes(b"not a folder")
    before = world.snapshot()
    check_outcome(case, world.run(out=world.root / "a-file" / "out"))
    assert_untouched(before, world.snapshot(), case)


@scenario("_job.json is not JSON")
def _(case, world):
    world.out.mkdir()
    (world.out / "_job.json").write_text('{"model": ')
    refused_untouched(case, world)


def bad_option(case, world, *extra: str, command: str = "baseline") -> None:
    refused_untouched(case, world, *extra, command=command)
    assert not world.out.exists()


for _name, _extra, _command in [
    ("--eta nan", ("--eta", "nan"), "baseline"), ("--eta inf", ("--eta", "inf"), "baseline"),
    ("--alpha inf", ("--guidance", "g", "--alpha", "inf"), "lowdensity"),
    ("--tau nan", ("--guidance", "g", "--tau", "nan"), "lowdensity"),
    ("--beta -1", ("--guidance", "g", "--beta", "-1"), "lowdensity"),
    ("--num 0", ("--num", "0"), "baseline"), ("--num -3", ("--num", "-3"), "baseline"),
    ("--shard-size 0", ("--shard-size", "0"), "baseline"), ("--batch-size -1", ("--batch-size", "-1"), "baseline"),
    ("--steps 0", ("--steps", "0"), "baseline"), ("--seed -1", ("--seed", "-1"), "baseline"),
    ("--actors -1", ("--actors", "-1"), "baseline"),
]:
    SCENARIOS[_name] = lambda case, world, extra=_extra, command=_command: bad_option(case, world, *extra,
                                                                                        command=command)


# ------------------------------------------------------------------------------------------------
# the tests


def test_every_case_has_a_scenario():
    assert sorted(SCENARIOS) == sorted(c.name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_job(case, world, monkeypatch):
    run = SCENARIOS[case.name]
    if "monkeypatch" in run.__code__.co_varnames[:run.__code__.co_argcount]:
        run(case, world, monkeypatch)
    else:
        run(case, world)


def test_json_refuses_nan_naming_the_field(tmp_path):
    with pytest.raises(NonFiniteError, match=r"result\.json: field metrics\.loss\[1\] is nan"):
        write_json_atomic(tmp_path / "result.json", {"metrics": {"loss": [0.5, float("nan")]}})
    with pytest.raises(NonFiniteError, match=r"_job\.json: field eta is inf"):
        Storage(tmp_path).write_json("_job.json", {"eta": float("inf")})
    assert list(tmp_path.iterdir()) == []


def test_job_file_is_never_replaced(tmp_path):
    storage = Storage(tmp_path)
    storage.write_json("_job.json", {"num": 1}, replace=False)
    with pytest.raises(FileExistsError):
        storage.write_json("_job.json", {"num": 2}, replace=False)
    assert storage.read_json("_job.json") == {"num": 1} and sorted(os.listdir(tmp_path)) == ["_job.json"]
