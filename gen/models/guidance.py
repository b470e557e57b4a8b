"""Guidance folders (Sehwag et al. 2022's two guidance networks and their class Gaussians), written by
`tailforge train guidance` and read by low-density generation:

    DIR/guidance.json           input (x0 | xt | xt+x0), level sigmas, training config and figures
                                (held-out accuracy and per-image correctness per level), hashes
    DIR/classifier/             the embedding classifier (classifier.json + classifier.safetensors)
    DIR/discriminator/          the real-vs-synthetic discriminator (same format)
    DIR/gaussians.safetensors   class Gaussians of both, per noise level

The folder's entries are published as one version (gen/models/folders.py), so they always belong together.
Each net's classifier.json records its ``in_chans`` (gen.methods.config.guidance_in_chans: 2 C + 1 for
"xt+x0", Sastry et al. 2023's denoise-augmented classifiers) and its ``guidance_input``.
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
from tailforge.gen.methods.config import GUIDANCE_INPUTS
from tailforge.gen.methods.lowdensity import ClassGaussians, GuidanceModels, GuidanceNet
from tailforge.gen.models.classifiers import CLASSIFIER_WEIGHTS, load_classifier, write_classifier
from tailforge.gen.models.folders import publish_folder, read_published

GUIDANCE_FILE = "guidance.json"


GAUSSIANS_FILE = "gaussians.safetensors"
# a guidance folder's own entries; the loader needs guidance.json first (gen/models/folders.py)
GUIDANCE_ENTRIES = (GUIDANCE_FILE, "classifier", "discriminator", GAUSSIANS_FILE)


def save_guidance(folder: str | os.PathLike, classifier: GuidanceNet, classifier_config: dict[str, Any],
                  discriminator: GuidanceNet, discriminator_config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write a guidance folder, published as one version (gen/models/folders.py: written and
    fsynced, then made current by one rename, so a crash midway leaves the previous guidance
    folder loadable); returns the guidance.json written (info plus input, levels, hashes)."""
    written = {}

    def write(version: Path) -> None:
        state = {"level_sigmas": classifier.level_sigmas.cpu()}
        for name, net, config in (("classifier", classifier, classifier_config),
                                  ("discriminator", discriminator, discriminator_config)):
            write_classifier(version / name, net.net, {**config, "guidance_input": net.input})
            for level, g in enumerate(net.gaussians):
                state.update(g.state(f"{name}.level{level}"))
        save_file(state, str(version / GAUSSIANS_FILE))
        written.update({**info, "input": classifier.input, "level_sigmas": classifier.level_sigmas.tolist(),
                        "classifier_sha256": file_sha256(version / "classifier" / CLASSIFIER_WEIGHTS),
                        "guidance_hash": _guidance_hash(version)})
        write_json_atomic(version / GUIDANCE_FILE, written)

    publish_folder(folder, GUIDANCE_ENTRIES, write)
    return written


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
    return read_published(folder, GUIDANCE_ENTRIES[0], lambda version: _load_version(version, device))


def _load_version(folder: Path, device: str | torch.device) -> GuidanceModels:
    info = read_json(folder / GUIDANCE_FILE, "guidance description (written by `tailforge train guidance`)")
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
