"""The idx format of MNIST-style datasets (LeCun et al. 1998), read strictly.

An idx file is a 4-byte magic number ``0x00 0x00 TYPE NDIMS``, NDIMS big-endian uint32 sizes, then
the data in C order. TYPE 0x08 is unsigned bytes, the only type MNIST, Fashion-MNIST (Xiao et al.
2017) and KMNIST use. A dataset folder holds four such files, gzipped or not:

    train-images-idx3-ubyte   train-labels-idx1-ubyte   t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

(torchvision's ``MNIST/raw/`` folders have this layout too). Every malformed field is a
DatasetError naming the file and the field; nothing here trusts a size it has not checked against
the bytes that are actually there.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from tailforge.gen.core.errors import DatasetError

#: split -> (images file, labels file), without the optional ".gz"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
UBYTE = 0x08
#: an idx file larger than this is refused before it is read (Fashion-MNIST's largest is 47 MB raw)
MAX_IDX_BYTES = 1 << 30


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(MAX_IDX_BYTES + 1)
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: cannot read this idx file ({err})") from None
    if len(data) > MAX_IDX_BYTES:
        raise DatasetError(f"{path}: larger than {MAX_IDX_BYTES} bytes; not an MNIST-style idx file")
    return data


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """The array an idx file holds; `name` is what errors call the file."""
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes, shorter than the 4-byte idx magic number")
    zero, dtype, ndims = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DatasetError(f"{name}: magic number {data[:4].hex()} does not start with 0000; not an idx file")
    if dtype != UBYTE:
        raise DatasetError(f"{name}: data type 0x{dtype:02x} in the magic number; only unsigned bytes (0x08) "
                           f"are read")
    if not 1 <= ndims <= 4:
        raise DatasetError(f"{name}: {ndims} dimensions in the magic number; expected 1 (labels) or 3 (images)")
    header = 4 + 4 * ndims
    if len(data) < header:
        raise DatasetError(f"{name}: truncated in its dimension sizes ({len(data)} bytes, header needs {header})")
    shape = struct.unpack(f">{ndims}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(f"{name}: dimension sizes {list(shape)} need {expected} bytes, the file has {len(data)}"
                           f" ({'truncated' if len(data) < expected else 'trailing bytes'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (``.gz`` or raw)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def find_idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 1, H, W] and int64 labels [N] of one split of an idx folder."""
    found = {stem: find_idx_file(root, stem) for stem in IDX_FILES[split]}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        raise DatasetError(f"{root}: no {' or '.join(missing)}[.gz]; an idx folder holds the four files "
                           f"{', '.join(s for pair in IDX_FILES.values() for s in pair)} (gzipped or not)")
    images_path, labels_path = (found[stem] for stem in IDX_FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(f"{images_path}: dimension sizes {list(images.shape)}; expected N x H x H images")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path}: dimension sizes {list(labels.shape)}; expected one label per image")
    if len(labels) != len(images):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    return images[:, None].copy(), labels.astype(np.int64)  # copies: frombuffer arrays are read-only
