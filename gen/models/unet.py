"""Class-conditional U-Net presets, built on diffusers' ``UNet2DModel``."""

from __future__ import annotations

from diffusers import UNet2DModel

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.models.config import UNET_PRESETS


def default_preset(image_size: int) -> str:
    """The preset `train diffusion` uses when none is named: tiny for small images, small otherwise."""
    return "tiny" if image_size <= 16 else "small"


def build_unet(preset: str, *, image_size: int, channels: int, num_classes: int | None) -> UNet2DModel:
    """A U-Net for `channels` x `image_size`^2 images; class-conditional when num_classes (the number of
    class embeddings, a null class included) is set: a learned class embedding added to the timestep
    embedding."""
    if preset not in UNET_PRESETS:
        raise ConfigError(f"unknown U-Net preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    config = UNET_PRESETS[preset]
    levels = len(config["block_out_channels"])
    if image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"preset {preset!r} downsamples {levels - 1} times, so the image size must be divisible by "
            f"{2 ** (levels - 1)}; got {image_size}")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=num_classes,
        **config,
    )
