"""Image conversions at the boundaries: float NCHW in [-1, 1] inside the code, uint8 and PNG outside."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode  # importing torchvision.io registers torch.ops.image

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


_PNG_START = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"  # the signature, then IHDR (13 bytes long) comes first
_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the IEND chunk (empty, so its CRC is a constant)
_IHDR = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, filter, interlace
_IHDR_SIZE = struct.Struct(">II")  # IHDR's first fields: width, height
_CHUNK_HEAD = struct.Struct(">I4s")  # a chunk's data length and type
_CHANNELS = {0: 1, 2: 3}  # PNG colour type -> channels: what encode_png writes (grayscale, RGB)
#: The most pixels (width x height) a shard image may have, checked on the header before anything
#: is decoded, on every path (torchvision's libpng and PIL): 4096 x 4096. A decompression bomb (a
#: small file declaring a huge image) is a ShardError instead of gigabytes of memory. PIL's own
#: Image.MAX_IMAGE_PIXELS (89 M, and a DecompressionBombError only past twice that) is far above
#: anything a classifier's training data holds.
MAX_IMAGE_PIXELS = 1 << 24
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of a 16-bit grayscale PNG
# torchvision's libpng operator, which torchvision.io.decode_png wraps. The wrapper is deprecated
# since torchvision 0.29 (in favour of torchcodec; the pinned range is < 0.30) and warns on every
# call; calling the operator itself skips that warning and 1.6 us of wrapping per image, which pays
# for _is_plain_png.
_LIBPNG_DECODE = torch.ops.image.decode_png


def _is_plain_png(data: bytes) -> bool:
    """Whether `data` is a plain, intact PNG that torchvision's libpng decoder can take. Plain:
    8-bit grayscale or RGB of at most MAX_IMAGE_PIXELS pixels (the cap, checked on IHDR before libpng
    sees the image), not interlaced, IHDR then IDAT chunks then IEND and nothing else.
    Intact: every chunk's CRC, the zlib stream (with its Adler-32) and its size, and every row's
    filter byte are right. torchvision turns a libpng error into a crash of the whole process (a
    segmentation fault on a bad CRC or zlib stream, torchvision 0.29), so only an image that
    leaves libpng nothing to object to goes there."""
    if not (data.startswith(_PNG_START) and data.endswith(_PNG_END)
            and zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")):
        return False
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(data, 16)
    channels = _CHANNELS.get(colour)
    if channels is None or depth != 8 or compression or filtering or interlace or not 0 < width * height <= MAX_IMAGE_PIXELS:
        return False
    pos, end, idat = 33, len(data) - len(_PNG_END), []
    while pos < end:
        length, kind = _CHUNK_HEAD.unpack_from(data, pos) if pos + 12 <= end else (0, b"")
        stop = pos + 8 + length
        if kind != b"IDAT" or stop + 4 > end or zlib.crc32(data[pos + 4:stop]) != int.from_bytes(data[stop:stop + 4], "big"):
            return False
        idat.append(data[pos + 8:stop])
        pos = stop + 4
    row = 1 + width * channels  # each row: its filter type (0-4), then the filtered bytes
    try:  # at most one byte more than the image needs: a zlib bomb in IDAT stops here
        pixels = zlib.decompressobj().decompress(b"".join(idat), height * row + 1)
    except zlib.error:
        return False
    return len(pixels) == height * row and max(pixels[::row]) <= 4


def decode_image(data: bytes) -> Tensor:
    """Image bytes to uint8 CHW (the code-internal layout): 1 channel for grayscale, 3 for colour
    (alpha dropped, palettes expanded, as PIL's convert to "L" / "RGB" does). The one decoder of
    shard images, for the shard reader (gen/data/shards/read.py) and the training stream
    (train/streams.py). Raises ShardError when the bytes are not a readable image or declare more
    than MAX_IMAGE_PIXELS pixels; 16-bit grayscale is reduced to 8 bits (see _sixteen_to_eight_bits).

    Plain PNGs (everything encode_png writes; see _is_plain_png) go through torchvision's libpng
    decoder, the rest (damaged, palette, alpha, 16-bit, JPEG, ...) through PIL, whose errors are
    exceptions and whose mode conversion is the contract. Measured on 128 noise PNGs (2-core CPU,
    median of 50): 8x8 grayscale 0.89 ms (PIL 3.2 ms; torchvision.io.decode_png 0.85 ms, which
    crashes on damaged ones), 28x28 grayscale 1.24 ms (PIL 3.5, torchvision 1.08), equal pixels.
    """
    if _is_plain_png(data):  # its IHDR declares at most MAX_IMAGE_PIXELS
        return _LIBPNG_DECODE(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED.value, False)
    if data.startswith(_PNG_START) and len(data) >= 16 + _IHDR_SIZE.size:  # before PIL parses any chunk
        _check_pixels(*_IHDR_SIZE.unpack_from(data, 16))
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(*img.size)
            if img.mode in _SIXTEEN_BIT_GRAY:
                array = _sixteen_to_eight_bits(np.asarray(img))
            else:
                array = np.asarray(img.convert("L" if img.mode in ("1", "L") else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL: UnidentifiedImageError, broken chunks / CRC
        raise ShardError(str(err)) from None
    return torch.from_numpy((array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy())


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ShardError(f"image of {width} x {height} pixels exceeds the cap of {MAX_IMAGE_PIXELS} pixels "
                         "(a decompression bomb?); refused before decoding")


def _sixteen_to_eight_bits(array: np.ndarray) -> np.ndarray:
    """16-bit gray to 8 bits by the high byte (value >> 8), as PIL itself reduces 16-bit RGB PNGs and
    libpng's png_set_strip_16 does, so a 16-bit image reads alike in gray and colour; an 8-bit image
    stored as 16 bits (v * 257) comes back exactly. PIL's convert("L") would clip every value above
    255 to white instead."""
    if array.min(initial=0) < 0 or array.max(initial=0) > 0xFFFF:
        raise ShardError(f"grayscale image with values outside 0..65535 ({array.dtype}); not a 16-bit image")
    return (array.astype(np.uint32) >> 8).astype(np.uint8)
