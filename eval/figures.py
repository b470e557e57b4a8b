"""Image grids and figure encoding shared by the evaluation commands and the report."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, ncols: int, *, scale: int | None = None, pad: int = 1,
               pad_value: int = 255) -> Image.Image:
    """Tile uint8 NCHW images (C = 1 or 3) row-major into one PIL image, each upscaled by `scale`
    with nearest-neighbour (default: to about 48 px, so 8x8 digits stay crisp and visible) and
    separated by `pad` pixels."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 N x (1|3) x H x W images, got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    scale = scale or max(1, 48 // w)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((nrows * cell_h + pad, ncols * cell_w + pad, c), pad_value, dtype=np.uint8)
    big = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        row, col = divmod(i, ncols)
        top, left = pad + row * cell_h, pad + col * cell_w
        canvas[top:top + h * scale, left:left + w * scale] = big[i]
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)


def class_columns(labels: list[int], num_classes: int, per_class: int) -> list[int | None]:
    """Positions (into `labels`, taken in order) for a grid of `per_class` rows and one column per
    class, row-major: row r, column c is the r-th item of class c, None where the class has fewer."""
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for position, label in enumerate(labels):
        if 0 <= label < num_classes and len(members[label]) < per_class:
            members[label].append(position)
    return [members[c][r] if r < len(members[c]) else None for r in range(per_class) for c in range(num_classes)]


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """Bytes as a data URI, so the report embeds every figure and needs no network or side files."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

