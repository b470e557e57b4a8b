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


def test_idx_datasets_through_the_registry(tmp_path):
    from tailforge.gen.data.datasets import load_dataset

    rng = np.random.default_rng(1)
    images = {"train": rng.integers(0, 256, (8, 6, 6)), "test": rng.integers(0, 256, (4, 6, 6))}
    write_idx_folder(tmp_path, images, {"train": np.arange(8) % 10, "test": np.arange(4)}, gz=False)
    data = load_dataset(f"mnist:{tmp_path}", "test")
    assert data.images.shape == (4, 1, 6, 6) and data.info.class_names == tuple("01234567")  # labels 0..7
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images["test"])
    # a resized copy is antialiased as PIL's bilinear reduction is (a triangle filter widened to the
    # scale), within a level of rounding
    from PIL import Image

    small = load_dataset(f"mnist:{tmp_path}?size=3", "train")
    assert small.images.shape == (8, 1, 3, 3) and small.info.image_size == 3
    pil = np.stack([np.asarray(Image.fromarray(im.astype(np.uint8)).resize((3, 3), Image.BILINEAR))
                    for im in images["train"]])
    assert np.abs(small.images[:, 0].numpy().astype(int) - pil.astype(int)).max() <= 1
    assert load_dataset(f"fashion-mnist:{tmp_path}?n=5").info.class_names[9] == "Ankle boot"


def test_a_missing_fashion_mnist_folder_says_what_to_install(tmp_path):
    from tailforge.gen.data.datasets import load_dataset

    with pytest.raises(DatasetError) as err:
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert all(stem in message for pair in IDX_FILES.values() for stem in pair)


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package():
    from tailforge.gen.data.datasets import load_dataset

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist?size=16", "test")
    assert train.images.shape == (60_000, 1, 28, 28) and len(test) == 10_000 and test.info.image_size == 16
    assert np.bincount(train.labels.numpy()).tolist() == [6000] * 10
    assert train.info.class_names[0] == "T-shirt/top"
