"""Model settings the command line checks, importable without torch or diffusers."""

from __future__ import annotations

from typing import Any

#: U-Net architecture presets (keyword arguments of diffusers' UNet2DModel, gen/models/unet.py).
#: Image size, channels and the number of classes come from the dataset.
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
