"""Model folders and checkpoints: safetensors + JSON, never pickles.

A diffusion model folder is a diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
``scheduler/``) plus ``tailforge.json`` with what the model was trained on. A plain diffusers
folder (e.g. a converted ``google/ddpm-cifar10-32``) loads too; its metadata is read off the
U-Net and scheduler configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError

from tailforge.gen.core.errors import CheckpointError
from tailforge.gen.core.files import (
    file_sha256,
    read_json,
    write_json_atomic,
)
from tailforge.gen.diffusion.denoiser import EpsDenoiser, UNetEpsModel
from tailforge.gen.models.folders import publish_folder, read_published

MODEL_META = "tailforge.json"


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# a model folder's own entries; the loader needs unet/ first (gen/models/folders.py)
MODEL_ENTRIES = ("unet", "scheduler", "model_index.json", MODEL_META)


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
    """Write a model folder, published as one version (gen/models/folders.py): the folder is also
    the training run's folder (checkpoints/, train_log.jsonl), so it cannot be swapped by one
    rename; instead the U-Net, scheduler and metadata are written and fsynced into a new version
    folder that one rename of the pointer makes current, so weights and metadata never disagree
    and a crash midway leaves the previous model loadable."""

    def write(version: Path) -> None:
        unet.save_pretrained(version / "unet", safe_serialization=True)
        scheduler.save_pretrained(version / "scheduler")
        write_json_atomic(version / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]})
        write_json_atomic(version / MODEL_META, dataclasses.asdict(meta))

    publish_folder(folder, MODEL_ENTRIES, write)


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
    shown = Path(path)
    if not shown.is_dir():
        raise CheckpointError(f"model folder does not exist: {shown}")
    return read_published(shown, MODEL_ENTRIES[0], lambda version: _load_version(shown, version, device))


def _load_version(shown: Path, folder: Path, device: str | torch.device) -> DiffusionModel:
    """The model in `folder` (the current version of the model folder `shown`, or `shown` itself)."""
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
    elif folder != shown:
        raise CheckpointError(f"{shown} is a tailforge model folder without {MODEL_META} in its current version "
                              f"({folder}): it was changed by hand; export the model again")
    else:
        meta = _meta_from_diffusers(shown, unet)
    denoiser = EpsDenoiser(UNetEpsModel(unet.eval(), meta.null_class), scheduler.alphas_cumprod).to(device)
    return DiffusionModel(denoiser=denoiser, meta=meta, model_hash=file_sha256(weights)[:16], path=str(shown))
