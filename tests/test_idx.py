"""The idx reader on small files the tests write: gzipped and raw, and every malformed field."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from tailforge.gen.core.errors import DatasetError
from tailforge.gen.data.idx import IDX_FILES, read_idx, read_idx_split


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def write_idx_folder(root, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], gz: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, (image_stem, label_stem) in IDX_FILES.items():
        for stem, array in ((image_stem, images[split]), (label_stem, labels[split])):
            data = idx_bytes(array)
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_a_written_folder_reads_back_exactly(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (7, 5, 5)), "test": rng.integers(0, 256, (3, 5, 5))}
    labels = {"train": rng.integers(0, 10, 7), "test": rng.integers(0, 10, 3)}
    write_idx_folder(tmp_path, images, labels, gz)
    for split in ("train", "test"):
        x, y = read_idx_split(tmp_path, split)
        assert x.shape == (len(labels[split]), 1, 5, 5) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0], images[split])
        np.testing.assert_array_equal(y, labels[split])


def test_malformed_files_name_the_file_and_the_field(tmp_path):
    good = idx_bytes(np.zeros((4, 3, 3)))
    cases = {
        "short": (b"\x00\x00", "shorter than the 4-byte idx magic"),
        "magic": (b"\x01\x00" + good[2:], "does not start with 0000"),
        "dtype": (idx_bytes(np.zeros((4, 3, 3)), dtype_code=0x0D), "data type 0x0d"),
        "dims": (good[:3] + b"\x07" + good[4:], "7 dimensions"),
        "header": (good[:10], "truncated in its dimension sizes"),
        "truncated": (good[:-5], "truncated"),
        "trailing": (good + b"\x00", "trailing bytes"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DatasetError, match=message) as err:
            read_idx(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="bad.gz: cannot read"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(DatasetError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


def test_a_folder_missing_files_or_mismatched_counts_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte or train-labels-idx1-ubyte"):
        read_idx_split(tmp_path, "train")
    images = {"train": np.zeros((5, 4, 4)), "test": np.zeros((2, 4, 4))}
    write_idx_folder(tmp_path, images, {"train": np.zeros(4), "test": np.zeros(2)}, gz=False)
    with pytest.raises(DatasetError, match="4 labels for the 5 images"):
        read_idx_split(tmp_path, "train")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 4, 3))))
    with pytest.raises(DatasetError, match="expected N x H x H"):
        read_idx_split(tmp_path, "test")
