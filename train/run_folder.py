"""Run folders: checkpoints of training runs (weights, optimizer state, config), written atomically.

Diffusion and classifier training (train/diffusion.py, train/classifier.py) keep their checkpoints
the same way (:class:`CheckpointFolders`): ``OUT/checkpoints/<unit>-NNNN/`` holds what the trainer
writes plus ``state.json`` (the counter, the run's config and the trainer's extra state), written
into a temporary folder that is fsynced and renamed into place. state.json records the size and
sha256 of every file, so a checkpoint a power cut left incomplete is recognised and skipped. A
re-run resumes from the newest readable one when its config equals the run's, except for the
fields the trainer declares resumable (they do not change what is trained).

Training logs (:func:`open_log`): every trainer appends one JSON object per line to a JSONL log.
Inside :func:`log_to_tensorboard` each log is also mirrored to TensorBoard, so dashboards need no
change to the training loops.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import torch
from safetensors.torch import save_file

from tailforge.gen.core.errors import CheckpointError, ConfigError
from tailforge.gen.core.files import (
    file_sha256,
    fsync_dir,
    load_safetensors,
    read_json,
    write_json_atomic,
)
from tailforge.gen.models.folders import fsync_tree

STATE_FILE = "state.json"
STAGING_PREFIX = ".tmp-"  # checkpoints being written (a crash may leave one; dirs() never lists it)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointFolders:
    """The checkpoint folders of one run: ``folder/<unit>-<counter>/``."""

    folder: Path  # where the checkpoint folders live (OUT/checkpoints)
    unit: str  # "step" or "epoch": the folder-name prefix and state.json's counter field
    digits: int  # zero padding of the counter, so that folder names sort in counter order
    config_json: dict[str, Any]  # the run's config, saved in every state.json
    resumable: tuple[str, ...]  # config fields a resumed run may change
    keep: int  # how many of the newest checkpoints are kept

    def dirs(self) -> list[Path]:
        """Every complete checkpoint folder, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{self.unit}-*") if p.is_dir())

    def save(self, counter: int, write: Callable[[Path], None], **state: Any) -> None:
        """Checkpoint `counter`: ``write(folder)`` writes the trainer's files, state.json gets the
        counter, the config, `state` and the size and sha256 of every file; the folder is fsynced
        (files, then the folder), renamed into place (replacing an unreadable one of the same
        counter), the parent fsynced, and old checkpoints pruned."""
        created = not self.folder.is_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(self.folder.parent)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=STAGING_PREFIX))
        target = self.folder / f"{self.unit}-{counter:0{self.digits}d}"
        replaced = staging.with_name(f"{staging.name}-replaced")
        try:
            write(staging)
            files = {str(p.relative_to(staging)): [p.stat().st_size, file_sha256(p)]
                     for p in sorted(staging.rglob("*")) if p.is_file()}
            write_json_atomic(staging / STATE_FILE, {self.unit: counter, "config": self.config_json,
                                                     "files": files, **state})
            fsync_tree(staging)
            if target.exists():  # an unreadable checkpoint that latest() skipped: this one replaces it
                target.rename(replaced)
            staging.rename(target)
            fsync_dir(self.folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(replaced, ignore_errors=True)
        for old in self.dirs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, state.json) of the newest readable checkpoint, None if there is none.

        A checkpoint a power cut left incomplete (state.json missing or not JSON, a file missing,
        or of another size or sha256 than state.json records) is skipped with a warning naming it,
        and the one before it is used. CheckpointError if the one used was written with another
        config (resumable fields aside)."""
        found = self.dirs()
        for folder in reversed(found):
            problem, state = _unreadable(folder, self.unit)
            if problem:
                log.warning("skipping checkpoint %s: %s", folder, problem)
                continue
            theirs, ours = (_without(config, self.resumable) for config in (state.get("config") or {}, self.config_json))
            if theirs != ours:
                changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                raise CheckpointError(f"{folder} was written by a run with a different config ({', '.join(changed)}); "
                                      "use a new --out folder, or the same settings to resume")
            return folder, state
        if found:
            log.warning("no readable checkpoint in %s: training starts over", self.folder)
        return None


def _unreadable(folder: Path, unit: str) -> tuple[str, dict[str, Any]]:
    """(what is wrong with a checkpoint folder, "" if nothing; its state.json)."""
    try:
        state = read_json(folder / STATE_FILE, "checkpoint state")
    except CheckpointError as err:
        return str(err), {}
    if not isinstance(state, dict) or not isinstance(state.get(unit), int):
        return f"{folder / STATE_FILE} has no {unit!r} counter", {}
    files = state.get("files", {})  # absent in checkpoints written before files were recorded
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        return f"{folder / STATE_FILE} has a malformed file list", state
    for name, (size, sha256) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing", state
        if path.stat().st_size != size or file_sha256(path) != sha256:
            return f"{name} is not the file that was written (empty, truncated or changed)", state
    return "", state


def _without(config_json: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in config_json.items() if k not in fields}


def save_optimizer(optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    """Optimizer state as ``optimizer.safetensors`` (every tensor, keyed ``state.<param>.<name>``)
    plus ``optimizer.json`` (param groups and non-tensor state), so resuming never unpickles."""
    folder = Path(folder)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            key = f"state.{param_id}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json_atomic(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    tensors = load_safetensors(folder / "optimizer.safetensors")
    meta = read_json(folder / "optimizer.json", "optimizer state")
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"optimizer state in {folder} does not match the model: {err}") from err


def open_log(path: Path, keep: Callable[[dict[str, Any]], bool] = lambda entry: True) -> TextIO | TensorBoardLog:
    """Open a JSONL training log for appending, after dropping the entries `keep` rejects (those
    a resumed run redoes). A torn last line (a crash mid-write) is dropped with a warning; a
    malformed line elsewhere is a CheckpointError naming the file and line.

    Inside :func:`log_to_tensorboard` the log is a :class:`TensorBoardLog` (the same ``write`` /
    ``flush`` / ``close``) whose TensorBoard run forgets every step after the last entry kept."""
    kept: list[dict[str, Any]] = []
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise CheckpointError(f"{path} line {number} is not JSON ({err}); repair or remove the log") from None
                log.warning("dropping the torn last line of %s (line %d)", path, number)
        kept = [entry for entry in entries if keep(entry)]
        if len(kept) != len(lines) or not path.read_text().endswith("\n"):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
            tmp.replace(path)
    folder = _tensorboard_folder.get()
    if folder is None:
        return path.open("a")
    run = path.stem.removesuffix("_log")
    last_kept = max((entry.get("step", 0) for entry in kept), default=0)
    return TensorBoardLog(path.open("a"), tensorboard_writer(folder if run == "train" else folder / run, last_kept + 1))


# ------------------------------------------------------------------------------------------------
# TensorBoard

#: SummaryWriter modules tried in order: torch's needs the `tensorboard` package, tensorboardX is
#: self-contained (both write the same event files)
TENSORBOARD_WRITERS = ("torch.utils.tensorboard", "tensorboardX")
TENSORBOARD_EXTRA = "pip install 'tailforge[tensorboard]'"
_tensorboard_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("tensorboard_folder", default=None)


def summary_writer_class() -> type:
    """The first importable SummaryWriter of :data:`TENSORBOARD_WRITERS`."""
    for module in TENSORBOARD_WRITERS:
        try:
            return importlib.import_module(module).SummaryWriter
        except ImportError:  # torch.utils.tensorboard raises it when the tensorboard package is missing
            continue
    raise ConfigError(f"--tensorboard needs the tensorboard or tensorboardX package: {TENSORBOARD_EXTRA}")


@contextlib.contextmanager
def log_to_tensorboard(folder: str | os.PathLike | None) -> Iterator[None]:
    """Inside this block every training log :func:`open_log` opens also goes to TensorBoard under
    ``folder``: ``train_log.jsonl`` to ``folder`` itself, another log ``NAME_log.jsonl`` (the
    guidance nets') to ``folder/NAME``. None: no TensorBoard. Fails at once, before any training,
    when neither writer package is installed. Ray Train workers are other processes: the trainer
    passes :func:`tensorboard_folder` to them and enters this block there."""
    if folder is None:
        yield
        return
    summary_writer_class()
    token = _tensorboard_folder.set(Path(folder))
    try:
        yield
    finally:
        _tensorboard_folder.reset(token)


def tensorboard_folder() -> Path | None:
    """The folder of the enclosing :func:`log_to_tensorboard` block (None outside one)."""
    return _tensorboard_folder.get()


def tensorboard_writer(folder: Path, purge_step: int):
    """A SummaryWriter on ``folder`` whose run forgets the events of steps >= ``purge_step`` that
    earlier writers left (a resumed run redoes them; TensorBoard applies the purge when it reads).
    The file name ends in the nanosecond clock so that two writers started within the same second
    neither share a file nor sort out of order (TensorBoard reads a run's files in name order)."""
    return summary_writer_class()(str(folder), purge_step=purge_step, filename_suffix=f".{time.time_ns():020d}")


def scalar_fields(entry: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every number in a log entry except its step; a nested dict's numbers are
    tagged ``field/key`` (the classifier's observed mix: ``mix/real``). Strings and booleans are
    no scalars."""
    for name, value in entry.items():
        if isinstance(value, dict):
            yield from scalar_fields(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and f"{prefix}{name}" != "step":
            yield f"{prefix}{name}", float(value)


class TensorBoardLog:
    """A JSONL training log that writes every entry's numbers to TensorBoard as scalars at the
    entry's ``step`` too (see :func:`scalar_fields`)."""

    def __init__(self, file: TextIO, writer: Any):
        self.file, self.writer = file, writer

    def write(self, text: str) -> int:
        written = self.file.write(text)
        for line in filter(str.strip, text.splitlines()):
            entry = json.loads(line)
            for tag, value in scalar_fields(entry):
                self.writer.add_scalar(tag, value, entry["step"])
        return written

    def flush(self) -> None:
        self.file.flush()
        self.writer.flush()

    def close(self) -> None:
        self.file.close()
        self.writer.close()
