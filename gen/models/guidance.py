"""Guidance folders (Sehwag et al. 2022's two guidance networks and their class Gaussians), written by
`tailforge train guidance` and read by low-density generation:

    DIR/guidance.json           input (x0 | xt), level sigmas, training config and figures, hashes
    DIR/classifier/             the embedding classifier (classifier.json + classifier.safetensors)
    DIR/discriminator/          the real-vs-synthetic discriminator (same format)
    DIR/gaussians.safetensors   class Gaussians of both, per noise level

guidance.json is written last, so a folder without it is incomplete and is not loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tailforge.gen.core.errors import CheckpointError, ConfigError
from tailforge.gen.core.files import file_sha256, load_safetensors, read_json, write_json_atomic
from tailforge.gen.methods.lowdensity import (
    GUIDANCE_INPUTS,
    ClassGaussians,
    GuidanceModels,
    GuidanceNet,
)
from tailforge.gen.models.classifiers import CLASSIFIER_WEIGHTS, load_classifier, save_classifier

GUIDANCE_FILE = "guidance.json"


GAUSSIANS_FILE = "gaussians.safetensors"


def save_guidance(folder: str | os.PathLike, classifier: GuidanceNet, classifier_config: dict[str, Any],
                  discriminator: GuidanceNet, discriminator_config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write a guidance folder; returns the guidance.json written (info plus input, levels, hashes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GUIDANCE_FILE).unlink(missing_ok=True)
    state = {"level_sigmas": classifier.level_sigmas.cpu()}
    for name, net, config in (("classifier", classifier, classifier_config),
                              ("discriminator", discriminator, discriminator_config)):
        save_classifier(folder / name, net.net, {**config, "guidance_input": net.input})
        for level, g in enumerate(net.gaussians):
            state.update(g.state(f"{name}.level{level}"))
    tmp = folder / f".{GAUSSIANS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / GAUSSIANS_FILE)
    full = {**info, "input": classifier.input, "level_sigmas": classifier.level_sigmas.tolist(),
            "classifier_sha256": file_sha256(folder / "classifier" / CLASSIFIER_WEIGHTS),
            "guidance_hash": _guidance_hash(folder)}
    write_json_atomic(folder / GUIDANCE_FILE, full)
    return full


def _guidance_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("classifier/" + CLASSIFIER_WEIGHTS, "discriminator/" + CLASSIFIER_WEIGHTS, GAUSSIANS_FILE):
        digest.update(file_sha256(folder / name).encode())
    return digest.hexdigest()[:16]


def load_guidance(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GuidanceModels:
    """Load a guidance folder written by `tailforge train guidance`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"guidance folder does not exist: {folder}")
    info = read_json(folder / GUIDANCE_FILE, "guidance description (written last by `tailforge train guidance`)")
    state = load_safetensors(folder / GAUSSIANS_FILE)
    if "level_sigmas" not in state or info.get("input") not in GUIDANCE_INPUTS:
        raise CheckpointError(f"{folder} is not a complete guidance folder (level_sigmas / input missing)")
    levels = state["level_sigmas"]
    nets = []
    for name in ("classifier", "discriminator"):
        net, _ = load_classifier(folder / name, device)
        try:
            gaussians = [ClassGaussians.from_state(state, f"{name}.level{i}").to(device) for i in range(len(levels))]
        except ConfigError as err:
            raise CheckpointError(f"{folder / GAUSSIANS_FILE}: {err}") from None
        nets.append(GuidanceNet(net, gaussians, levels, info["input"]).to(device))
    return GuidanceModels(nets[0], nets[1], info)
