"""Run folders: checkpoints of training runs (weights, optimizer state, config), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tailforge.gen.core.errors import CheckpointError
from tailforge.gen.core.files import (
    load_safetensors,
    read_json,
    write_json_atomic,
)


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
