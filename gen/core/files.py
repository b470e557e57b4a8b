"""Files every package shares: atomic JSON, sha256, safetensors state dicts, never pickles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tailforge.gen.core.errors import CheckpointError, NonFiniteError, TailforgeError


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _non_finite_fields(obj: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """(field path such as ``sampling.eta`` or ``losses[3]``, value) of every NaN or Inf in `obj`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        yield where or "the value", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _non_finite_fields(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _non_finite_fields(value, f"{where}[{i}]")


def json_text(obj: Any, what: str = "JSON") -> str:
    """`obj` as indented, key-sorted JSON text. NaN and Inf are refused (a bare ``NaN`` is not
    JSON, and no reader of ours or of anyone else's accepts it): a NonFiniteError naming the field."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError:
        found = next(_non_finite_fields(obj), None)
        if found is None:  # not a NaN (a circular reference): a bug, keep its traceback
            raise
        raise NonFiniteError(f"{what}: field {found[0]} is {found[1]}, which JSON cannot hold; nothing was written") from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (NaN and Inf refused, see :func:`json_text`) to a temporary file in the same
    folder (created if missing), fsync it, rename it over `path` and fsync the folder."""
    path = Path(path)
    text = json_text(obj, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_json(data: bytes | str, what: str, error: type[TailforgeError] = CheckpointError) -> Any:
    """JSON text read from `what` (a description naming the file); malformed text is an `error`."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} is not valid JSON: {err}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    return parse_json(path.read_bytes(), f"{what} {path}")


def saved_result(path: str | os.PathLike, config: dict[str, Any], what: str = "saved result", *,
                 key: str = "config", **fields: Any) -> dict[str, Any] | None:
    """The JSON object at `path` if it is a finished output made with `config`, else None (also
    when there is no file): its `key` ("config", or "train_config" in model folders) holds every
    field of `config` with the same value (an output may record more, such as what it resolved)
    and its top-level `fields` are equal."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = read_json(path, what)
    made_with = saved.get(key) if isinstance(saved, dict) else None
    if not isinstance(made_with, dict) or any(made_with.get(k) != v for k, v in config.items()):
        return None
    return saved if all(saved.get(k) == v for k, v in fields.items()) else None


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def save_module(module: nn.Module, folder: str | os.PathLike, config: dict[str, Any],
                weights_name: str = "model.safetensors", config_name: str = "config.json") -> None:
    """Save a module's state dict as safetensors plus its JSON config (both atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{weights_name}.tmp"
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, folder / weights_name)
    write_json_atomic(folder / config_name, config)


def load_module_state(module: nn.Module, weights: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into `module`, naming the file and the mismatched keys on failure."""
    state = load_safetensors(weights)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{weights} does not match the model: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return module


def config_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-ready dict (copied into every output)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
