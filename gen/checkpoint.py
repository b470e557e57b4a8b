"""Model folders and checkpoints: safetensors + JSON, never pickles.

A diffusion model folder is a diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
``scheduler/``) plus ``tailforge.json`` with what the model was trained on. A plain diffusers
folder (e.g. a converted ``google/ddpm-cifar10-32``) loads too; its metadata is read off the
U-Net and scheduler configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .denoiser import EpsDenoiser, UNetEpsModel
from .errors import TailforgeError

MODEL_META = "tailforge.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class CheckpointError(TailforgeError):
    """A model folder or checkpoint that cannot be read; the message names the file."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder (created if missing), fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err


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


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """What a diffusion model folder records about its model (``tailforge.json``)."""

    image_size: int  # height = width of the images the model generates
    channels: int  # 1 for grayscale (digits), 3 for RGB
    num_classes: int | None  # None for an unconditional model
    class_names: tuple[str, ...] = ()  # names of the class labels, in label order
    # label of the "no class" embedding of a model trained with label dropout (train_diffusion's
    # label_dropout): it then also denoises without labels; None for every other model
    null_class: int | None = None
    dataset: str = ""  # dataset spec the model was trained on
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the training config
    step: int = 0  # optimizer steps taken

    @property
    def denoises_without_labels(self) -> bool:
        """Whether the model can be called without class labels (unconditional, or with a null class)."""
        return self.num_classes is None or self.null_class is not None


@dataclasses.dataclass
class DiffusionModel:
    """A loaded diffusion model: the Denoiser plus the metadata and weights hash that go into
    every shard it produces."""

    denoiser: EpsDenoiser
    meta: ModelMeta
    model_hash: str  # sha256 of the U-Net weights file (first 16 hex digits)
    path: str

    @property
    def device(self) -> torch.device:
        return self.denoiser.train_sigmas.device


def save_diffusion_model(folder: str | os.PathLike, unet: UNet2DModel, scheduler: DDPMScheduler,
                         meta: ModelMeta) -> None:
    """Write a model folder; files are written into a temporary sibling first and swapped in so a
    crash never leaves a folder whose weights and metadata disagree."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        write_json_atomic(staging / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]})
        write_json_atomic(staging / MODEL_META, dataclasses.asdict(meta))
        folder.mkdir(exist_ok=True)
        for name in ("unet", "scheduler", "model_index.json", MODEL_META):
            target = folder / name
            if target.is_dir():
                retired = folder / f".{name}.old"
                shutil.rmtree(retired, ignore_errors=True)
                target.rename(retired)
                (staging / name).rename(target)
                shutil.rmtree(retired)
            else:
                os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _meta_from_diffusers(folder: Path, unet: UNet2DModel) -> ModelMeta:
    num_classes = unet.config.num_class_embeds
    return ModelMeta(image_size=int(unet.config.sample_size), channels=int(unet.config.in_channels),
                     num_classes=int(num_classes) if num_classes is not None else None,
                     dataset=f"diffusers:{folder}")


def load_diffusion_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a model folder written by `tailforge train diffusion` or by diffusers' save_pretrained.

    Only safetensors weights are read (``use_safetensors=True``): a folder holding only pickled
    ``.bin`` weights is refused rather than unpickled.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder does not exist: {folder}")
    if not (folder / "unet" / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is not a diffusion model folder: expected unet/config.json and "
            f"{UNET_WEIGHTS} (written by `tailforge train diffusion` or diffusers' save_pretrained)")
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no safetensors U-Net weights ({weights}); pickled weights are not loaded")
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot load the U-Net in {folder / 'unet'}: {err}") from err
    scheduler_dir = folder / "scheduler"
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    else:
        scheduler = DDPMScheduler()  # DDPM's linear schedule, T = 1000 (Ho et al. 2020, Sec. 4)
    if (folder / MODEL_META).is_file():
        raw = read_json(folder / MODEL_META, "model metadata")
        try:
            meta = ModelMeta(**{**raw, "class_names": tuple(raw.get("class_names", ()))})
        except TypeError as err:
            raise CheckpointError(f"{folder / MODEL_META} has unexpected fields: {err}") from err
    else:
        meta = _meta_from_diffusers(folder, unet)
    denoiser = EpsDenoiser(UNetEpsModel(unet.eval(), meta.null_class), scheduler.alphas_cumprod).to(device)
    return DiffusionModel(denoiser=denoiser, meta=meta, model_hash=file_sha256(weights)[:16], path=str(folder))


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
