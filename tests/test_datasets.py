"""The dataset registry: shapes, splits, nested subsets, procedural datasets, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tailforge.gen.core.errors import DatasetError
from tailforge.gen.data.datasets import load_dataset, parse_spec
from tailforge.gen.data.procedural import gaussian_mixture_images, mondrian_images


def test_digits_fixed_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert not set(train.keys) & set(test.keys)
    assert all(35 <= c <= 37 for c in torch.bincount(test.labels).tolist())  # stratified
    assert torch.equal(load_dataset("digits").images, train.images)  # fixed, not re-drawn
    assert train.info.num_classes == 10 and not train.info.flip_augment


def test_subsets_are_nested_and_seeded():
    small, large = load_dataset("digits?n=100"), load_dataset("digits?n=300")
    assert len(small) == 100 and len(large) == 300
    assert set(small.keys) <= set(large.keys)
    assert set(load_dataset("digits?n=100&subset_seed=1").keys) != set(small.keys)
    assert len(load_dataset("digits?n=100", "test")) == 360  # the test split is never subset


@pytest.mark.parametrize("name", ["mondrian", "gm", "ri"])
def test_procedural_datasets_shapes_and_determinism(name):
    data = load_dataset(f"{name}?size=16&channels=3&train=50&test=10&seed=4")
    assert data.images.shape == (50, 3, 16, 16) and data.labels.unique().tolist() == [0]
    again = load_dataset(f"{name}?size=16&channels=3&train=50&test=10&seed=4")
    assert torch.equal(data.images, again.images)
    test = load_dataset(f"{name}?size=16&channels=3&train=50&test=10&seed=4", "test")
    assert len(test) == 10 and not torch.equal(test.images[:10], data.images[:10])


def test_random_ink_is_binary_and_balanced():
    images = load_dataset("ri?size=8&train=200").images
    assert set(images.unique().tolist()) == {0, 255}
    assert abs(images.float().mean().item() / 255 - 0.5) < 0.02


def test_mondrian_has_four_flat_quadrants():
    image = mondrian_images(np.random.default_rng(0), 1, 16, 3)[0]
    # every row outside the horizontal bar has at most 2 colours left/right of the vertical bar
    colours = {tuple(image[:, r, c]) for r in range(16) for c in range(16)}
    assert len(colours) > 4  # the cross carries random pixels
    corners = [tuple(image[:, 0, 0]), tuple(image[:, 0, 15]), tuple(image[:, 15, 0]), tuple(image[:, 15, 15])]
    assert len(set(corners)) == 4


def test_gaussian_mixture_follows_appendix_b2():
    rng = np.random.default_rng(0)
    images = gaussian_mixture_images(rng, 5000, 8, 1)
    assert images.min() >= 0 and images.max() <= 1
    means = np.random.default_rng([100, 8, 1]).random((100, 1, 8, 8))
    # each sample is nearest to one of the 100 fixed means; the residual std before clipping is 0.5
    dist = ((images[:, None] - means[None]) ** 2).reshape(5000, 100, -1).mean(-1)
    assert len(np.unique(dist.argmin(1))) > 90


def test_imagefolder_with_splits(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.images.shape == (6, 3, 12, 12) and data.info.class_names == ("cat", "dog")
    assert data.info.flip_augment
    assert load_dataset(f"imagefolder:{tmp_path}?size=8", "test").images.shape == (6, 3, 8, 8)


@pytest.mark.parametrize("spec,message", [
    ("", "empty dataset spec"),
    ("svhn", "unknown dataset 'svhn'"),
    ("cifar10", "needs a path"),
    ("digits:/tmp", "takes no path"),
    ("cifar10:/nonexistent/cifar", "dataset path not found: /nonexistent/cifar"),
    ("imagefolder:/nonexistent/imgs", "dataset path not found"),
    ("shards:/nonexistent/shards", "dataset path not found"),
    ("digits?n=abc", "n='abc'.*not an integer"),
    ("digits?n=0", "n=0.*must be >= 1"),
    ("digits?n=5000", "exceeds the 1437 training images"),
    ("digits?colour=red", "unknown option"),
    ("gm?channels=2", "channels=2.*must be 1 or 3"),
    ("digits?n=1&n=2", "given twice"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_cifar10_without_data_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_dataset(f"cifar10:{tmp_path}")


def test_imagefolder_errors_name_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "a" / "y.png")
    with pytest.raises(DatasetError, match="y.png has shape"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "a" / "y.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read image .*y.png"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_missing_split_is_named():
    with pytest.raises(DatasetError, match="no 'val' split"):
        load_dataset("digits", "val")


def test_parse_spec_options():
    parsed = parse_spec("gm?size=16&seed=2")
    assert parsed.name == "gm" and parsed.options == {"size": "16", "seed": "2"} and parsed.path is None
