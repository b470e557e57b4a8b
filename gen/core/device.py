"""The device work runs on when the caller names none."""

from __future__ import annotations

import torch


def default_device(device: str | None = None) -> str:
    """`device` if given, else "cuda" when a GPU is visible, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
