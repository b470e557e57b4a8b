"""The shard image decoder (gen.core.images.decode_image): what PIL's conversion gives, for every
image kind, and a ShardError (never a crash) for damaged bytes."""

from __future__ import annotations

import io
import random
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tailforge.gen.core.errors import ShardError
from tailforge.gen.core.images import decode_image, encode_png


def pil_reference(data: bytes) -> np.ndarray:
    """uint8 CHW as PIL converts the image: 1-bit / gray to "L", everything else to "RGB"; 16-bit gray
    by its high byte (PIL's convert would clip it at 255)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I", "I;16"):
            array = (np.asarray(img).astype(np.int64) >> 8).astype(np.uint8)
        else:
            array = np.asarray(img.convert("L" if img.mode in ("1", "L") else "RGB"))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def saved(img: Image.Image, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=format)
    return buf.getvalue()


@pytest.mark.parametrize("size,channels", [(1, 1), (8, 1), (28, 1), (8, 3), (32, 3), (256, 3)])
def test_our_pngs_decode_to_the_image_written(size, channels):
    image = np.random.default_rng(size).integers(0, 256, (size, size, channels), dtype=np.uint8)
    decoded = decode_image(encode_png(image))
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (channels, size, size)
    assert np.array_equal(decoded.numpy(), image.transpose(2, 0, 1))


def test_other_images_decode_as_pil_converts_them():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    images = {
        "1-bit": saved(Image.fromarray(pixels[:, :, 0] > 128)),
        "gray+alpha": saved(Image.fromarray(pixels[:, :, 0]).convert("LA")),
        "RGBA": saved(Image.fromarray(pixels)),
        "palette": saved(Image.fromarray(pixels[:, :, :3]).convert("P")),
        "16-bit": saved(Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)),
        "JPEG": saved(Image.fromarray(pixels[:, :, :3]), "JPEG"),
    }
    for kind, data in images.items():
        assert np.array_equal(decode_image(data).numpy(), pil_reference(data)), kind


def test_damaged_images_are_shard_errors_not_crashes():
    """torchvision's libpng decoder crashes the process on a bad CRC or zlib stream; such bytes
    must go where errors are exceptions. Mutations that leave a readable image decode as PIL does."""
    rng, pick = np.random.default_rng(1), random.Random(1)
    pngs = [encode_png(rng.integers(0, 256, (s, s, c), dtype=np.uint8)) for s in (8, 28) for c in (1, 3)]
    for trial in range(2000):
        data = bytearray(pick.choice(pngs))
        if trial % 3 == 0:
            data = data[:pick.randrange(len(data))]
        else:
            data[pick.randrange(len(data))] ^= 1 << pick.randrange(8)
            start = data.find(b"IDAT")
            if trial % 3 == 2 and start >= 4:  # repair the IDAT CRC: only the pixel data is damaged
                end = start + 4 + int.from_bytes(data[start - 4:start], "big")
                data[end:end + 4] = zlib.crc32(data[start:end]).to_bytes(4, "big")
        try:
            decoded = decode_image(bytes(data))
        except ShardError:
            continue
        assert np.array_equal(decoded.numpy(), pil_reference(bytes(data)))
    with pytest.raises(ShardError):
        decode_image(b"not an image")
