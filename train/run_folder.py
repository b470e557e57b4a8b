"""Run folders: checkpoints of training runs (weights, optimizer state, config), written atomically.

Diffusion and classifier training (train/diffusion.py, train/classifier.py) keep their checkpoints
the same way (:class:`CheckpointFolders`): ``OUT/checkpoints/<unit>-NNNN/`` holds what the trainer
writes plus ``state.json`` (the counter, the run's config and the trainer's extra state), written
into a temporary folder that is renamed into place, so a checkpoint folder is complete or absent.
A re-run resumes from the newest one when its config equals the run's, except for the fields the
trainer declares resumable (they do not change what is trained).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from tailforge.gen.core.errors import CheckpointError
from tailforge.gen.core.files import (
    load_safetensors,
    read_json,
    write_json_atomic,
)

STATE_FILE = "state.json"


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
        counter, the config and `state`; then the folder is renamed into place and old ones pruned."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tmp-"))
        try:
            write(staging)
            write_json_atomic(staging / STATE_FILE, {self.unit: counter, "config": self.config_json, **state})
            staging.rename(self.folder / f"{self.unit}-{counter:0{self.digits}d}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for old in self.dirs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(folder, state.json) of the newest checkpoint, None if there is none; CheckpointError if
        it was written with another config (resumable fields aside)."""
        found = self.dirs()
        if not found:
            return None
        state = read_json(found[-1] / STATE_FILE, "checkpoint state")
        theirs, ours = (_without(config, self.resumable) for config in (state.get("config") or {}, self.config_json))
        if theirs != ours:
            changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise CheckpointError(f"{found[-1]} was written by a run with a different config ({', '.join(changed)}); "
                                  "use a new --out folder, or the same settings to resume")
        return found[-1], state


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
