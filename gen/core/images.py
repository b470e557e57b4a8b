"""Image conversions at the boundaries: float NCHW in [-1, 1] inside the code, uint8 and PNG outside."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tailforge.gen.core.errors import ShardError


def uint8_to_float(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def float_to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 with rounding (values outside the range are clipped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HWC (C = 1 or 3) to PNG bytes. PIL writes no timestamp, so equal images give equal bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ShardError(f"expected a uint8 HxWx1 or HxWx3 image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable image) bytes to uint8 CHW (the code-internal layout)."""
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB"))
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy()
