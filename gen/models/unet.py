"""Class-conditional U-Net presets, built on diffusers' ``UNet2DModel``."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel

from tailforge.gen.core.errors import ConfigError

#: Architecture presets. Image size, channels and the number of classes come from the dataset.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # 0.65M parameters at 8x8x1 / 10 classes: trains on digits on two CPU cores in minutes
    # (DESIGN.md reference figures).
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    # 4.4M parameters: a CPU-trainable net for 16-32 px data, self-attention at half resolution.
    "small": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # The DDPM paper's CIFAR-10 network (Ho et al. 2020, Appendix B): 35.7M parameters, channel
    # multipliers (1, 2, 2, 2) of 128, two residual blocks per resolution, single-head
    # self-attention at 16x16, dropout 0.1. Same layout as google/ddpm-cifar10-32.
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.1,
    ),
}


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
