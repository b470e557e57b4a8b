"""Dataset registry: one spec string names every dataset the project reads.

    SPEC := NAME[:PATH][?KEY=VALUE[&KEY=VALUE...]]

    digits                       scikit-learn's bundled 8x8 digits (fixed 1437/360 train/test split)
    mondrian | gm | ri           Yoon et al. 2023's procedural datasets (Mondrian, Gaussian-mixture dummy,
                                 Random Ink); options size, channels, train, test, seed
    cifar10:PATH                 torchvision's CIFAR-10 python format on disk (never downloaded)
    imagefolder:PATH             PATH/CLASS/*.png|jpg, or PATH/{train,test}/CLASS/*; option size
    shards:PATH                  WebDataset shards with a timm-style _info.json (ours or anyone's); options
                                 skip_bad_shards, verify
    fashion-mnist[:PATH]         Fashion-MNIST's four idx files (default: Debian's dataset-fashion-mnist
                                 folder); option size (an antialiased resized copy)
    mnist:PATH                   any folder of MNIST-style idx files (MNIST, KMNIST, torchvision's raw/)

Every dataset accepts ``n=N`` (and ``subset_seed=S``): keep N training images chosen by a seeded
permutation, so ``n=100`` is a subset of ``n=300`` (nested subsets, as EMM needs; Gu et al. 2023 Sec. 3).
Images are held in memory as uint8 NCHW; the small-image regime this project trains on fits
easily, and large corpora are read as streams from shards instead.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from tailforge.gen.core.errors import DatasetError
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.data.procedural import gaussian_mixture_images, mondrian_images, random_ink_images

SPLITS = ("train", "test")
#: options every dataset takes (load_dataset applies them): a nested training subset
COMMON_OPTIONS = ("n", "subset_seed")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and labels of a dataset, copied into model metadata and reports."""

    spec: str  # the spec string it was loaded from
    image_size: int  # height = width
    channels: int  # 1 (grayscale) or 3 (RGB)
    num_classes: int  # number of class labels
    class_names: tuple[str, ...]  # label -> name
    flip_augment: bool  # whether horizontal flips preserve the class (natural images yes, digits no)


@dataclasses.dataclass
class LabeledImages:
    """One split of a dataset in memory."""

    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]
    keys: list[str]  # a stable name per image (source key in shards, index otherwise)
    info: DatasetInfo
    split: str
    read_report: dict = dataclasses.field(default_factory=dict)  # shard sets: shards read / skipped (ShardReadStats)

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self) -> Tensor:
        """Images as float in [-1, 1] (the code-internal convention)."""
        return uint8_to_float(self.images)

    def subset(self, index: Tensor | np.ndarray | list[int]) -> "LabeledImages":
        index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index],
                                   keys=[self.keys[i] for i in index.tolist()])


@dataclasses.dataclass(frozen=True)
class ParsedSpec:
    name: str
    path: str | None
    options: dict[str, str]


def with_option(spec: str, key: str, value: str) -> str:
    """`spec` with option key=value added (or replaced), e.g. for a CLI flag that maps to an option."""
    head, _, query = spec.partition("?")
    options = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k != key]
    return f"{head}?{urllib.parse.urlencode([*options, (key, value)])}"


def parse_spec(spec: str) -> ParsedSpec:
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset spec {spec!r}; known datasets: {', '.join(sorted(DATASETS))}")
    head, _, query = spec.partition("?")
    name, sep, path = head.partition(":")
    name = name.strip().lower()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r} in spec {spec!r}; known datasets: {', '.join(sorted(DATASETS))}")
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key in options:
            raise DatasetError(f"option {key!r} given twice in dataset spec {spec!r}")
        options[key] = value
    if query and not options:
        raise DatasetError(f"cannot parse options {query!r} in dataset spec {spec!r}; use ?key=value&key=value")
    loader = DATASETS[name]
    path = path or loader.default_path
    if loader.needs_path and not path:
        raise DatasetError(f"dataset {name!r} needs a path: use {name}:PATH (spec was {spec!r})")
    if not loader.needs_path and sep:
        raise DatasetError(f"dataset {name!r} takes no path (spec was {spec!r})")
    allowed = set(loader.options) | set(COMMON_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown} for dataset {name!r} in spec {spec!r}; allowed: {sorted(allowed)}")
    return ParsedSpec(name=name, path=path or None, options=options)


def _int_option(parsed: ParsedSpec, spec: str, key: str, default: int, minimum: int = 1) -> int:
    raw = parsed.options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DatasetError(f"option {key}={raw!r} in dataset spec {spec!r} is not an integer") from None
    if value < minimum:
        raise DatasetError(f"option {key}={value} in dataset spec {spec!r} must be >= {minimum}")
    return value


# --------------------------------------------------------------------------------------------
# Loaders. Each returns a LoadedDataset: every split it has, its class names and flip flag.

Splits = dict[str, tuple[Tensor, Tensor, list[str]]]


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
    """What a loader read."""

    splits: Splits  # split -> (images uint8 NCHW, labels int64, keys)
    class_names: tuple[str, ...]  # label -> name
    flip_augment: bool  # whether horizontal flips preserve the class
    read_report: dict = dataclasses.field(default_factory=dict)  # shard sets: shards read / skipped


def _index_keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(count)]


def _load_digits(parsed: ParsedSpec, spec: str) -> LoadedDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are counts 0..16 in the original 4x4-block scans; scale to 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    # A fixed, stratified 20 % test split (360 images) so every run compares on the same data.
    train_idx, test_idx = train_test_split(index, test_size=360, stratify=labels, random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    splits = {split: (torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]),
                      [f"digits-{i:04d}" for i in idx]) for split, idx in (("train", train_idx), ("test", test_idx))}
    return LoadedDataset(splits, tuple(str(c) for c in range(10)), False)


def _procedural(make: Callable[[np.random.Generator, int, int, int], np.ndarray], name: str):
    """Loader for a procedural dataset from Yoon et al. 2023; images are drawn from `make(rng, n, size, channels)`
    with values in [0, 1]. The test split uses a different stream of the same seed."""

    def load(parsed: ParsedSpec, spec: str) -> LoadedDataset:
        size = _int_option(parsed, spec, "size", 8, minimum=4)
        channels = _int_option(parsed, spec, "channels", 1)
        if channels not in (1, 3):
            raise DatasetError(f"option channels={channels} in dataset spec {spec!r} must be 1 or 3")
        counts = {"train": _int_option(parsed, spec, "train", 2000), "test": _int_option(parsed, spec, "test", 500)}
        seed = _int_option(parsed, spec, "seed", 0, minimum=0)
        splits = {}
        for stream, (split, count) in enumerate(counts.items()):
            rng = np.random.default_rng([seed, stream])
            images = np.round(make(rng, count, size, channels) * 255).astype(np.uint8)
            splits[split] = (torch.from_numpy(images), torch.zeros(count, dtype=torch.long), _index_keys(f"{name}-{split}", count))
        return LoadedDataset(splits, (name,), False)

    return load


def _require_dir(parsed: ParsedSpec, spec: str, hint: str) -> Path:
    path = Path(parsed.path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path not found: {path} (from spec {spec!r}). {hint}")
    return path


def _load_cifar10(parsed: ParsedSpec, spec: str) -> LoadedDataset:
    from torchvision.datasets import CIFAR10

    hint = ("Put torchvision's CIFAR-10 there (the folder holding cifar-10-batches-py/, as made by "
            "torchvision.datasets.CIFAR10(root, download=True) on a machine with network access).")
    root = _require_dir(parsed, spec, hint)
    splits = {}
    for split in SPLITS:
        try:
            ds = CIFAR10(str(root), train=(split == "train"), download=False)
        except RuntimeError as err:
            raise DatasetError(f"CIFAR-10 not found or corrupted under {root} (spec {spec!r}): {err}. {hint}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        splits[split] = (images, torch.tensor(ds.targets, dtype=torch.long), _index_keys(f"cifar10-{split}", len(images)))
    return LoadedDataset(splits, tuple(ds.classes), True)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def _read_folder(root: Path, spec: str, classes: list[str], size: int | None) -> tuple[Tensor, Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    images, labels, keys = [], [], []
    shape = None
    for label, name in enumerate(classes):
        for file in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
                    if size is not None:
                        scale = size / min(img.size)
                        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
                        left, top = (img.width - size) // 2, (img.height - size) // 2
                        img = img.crop((left, top, left + size, top + size))
                    array = np.asarray(img)
            except (UnidentifiedImageError, OSError) as err:
                raise DatasetError(f"cannot read image {file} (dataset {spec!r}): {err}") from None
            array = array[:, :, None] if array.ndim == 2 else array
            if shape is None:
                shape = array.shape
            if array.shape[0] != array.shape[1]:
                raise DatasetError(f"image {file} is {array.shape[1]}x{array.shape[0]}, not square; add ?size=N to {spec!r}")
            if array.shape != shape:
                raise DatasetError(f"image {file} has shape {array.shape}, others {shape}; add ?size=N to {spec!r} "
                                   "(and use images of one colour mode)")
            images.append(array.transpose(2, 0, 1))
            labels.append(label)
            keys.append(str(file.relative_to(root).with_suffix("")).replace("/", "_"))
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root} (dataset {spec!r})")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), keys


def _load_imagefolder(parsed: ParsedSpec, spec: str) -> LoadedDataset:
    root = _require_dir(parsed, spec, "Expected PATH/CLASS_NAME/IMAGE files, or PATH/train/... and PATH/test/....")
    size = _int_option(parsed, spec, "size", 0, minimum=0) or None
    split_roots = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() else {"train": root}
    classes = sorted(p.name for p in split_roots["train"].iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"no class folders under {split_roots['train']} (dataset {spec!r}); expected PATH/CLASS_NAME/*.png")
    splits = {split: _read_folder(path, spec, classes, size) for split, path in split_roots.items() if path.is_dir()}
    return LoadedDataset(splits, tuple(classes), True)


def _load_shards(parsed: ParsedSpec, spec: str) -> LoadedDataset:
    """Options ``skip_bad_shards=1`` (skip damaged shards, logged and counted in the read report)
    and ``verify=1`` (check each shard's sha256); PATH may be any fsspec URL (s3://bucket/set)."""
    from tailforge.gen.data.shards.read import ShardReadStats, iter_samples, read_manifest
    from tailforge.gen.data.storage import Storage, is_url

    if is_url(parsed.path):
        root = parsed.path
        if not Storage(root).exists():
            raise DatasetError(f"dataset path not found: {root} (from spec {spec!r})")
    else:
        root = _require_dir(parsed, spec, "Expected a folder of .tar shards with an _info.json manifest.")
    flags = {key: _int_option(parsed, spec, key, 0, minimum=0) > 0 for key in ("skip_bad_shards", "verify")}
    manifest = read_manifest(root)
    stats = ShardReadStats()
    splits = {}
    for split in manifest["splits"]:
        images, labels, keys = [], [], []
        for sample in iter_samples(root, split, stats=stats, **flags):
            images.append(sample["image"])
            labels.append(sample["label"])
            keys.append(sample["key"])
        if images:
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise DatasetError(f"shards under {root} hold images of several shapes {sorted(shapes)} (spec {spec!r})")
            splits[split] = (torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), keys)
    if "train" not in splits:
        raise DatasetError(f"shards under {root} have no non-empty 'train' split (spec {spec!r})")
    num_classes = int(manifest.get("num_classes") or (max(int(t[1].max()) for t in splits.values()) + 1))
    class_names = tuple(manifest.get("class_names") or (str(c) for c in range(num_classes)))
    return LoadedDataset(splits, class_names, bool(manifest.get("flip_augment", False)), stats.as_dict())


@dataclasses.dataclass(frozen=True)
class DatasetLoader:
    """A registered dataset: how it is loaded and which parts of a spec it takes."""

    load: Callable[[ParsedSpec, str], LoadedDataset]  # (parsed spec, spec text) -> what it read
    needs_path: bool  # NAME:PATH (True) or NAME alone (False)
    options: tuple[str, ...] = ()  # the ?key=value options its loader reads, besides COMMON_OPTIONS
    default_path: str | None = None  # the path NAME alone reads (a needs_path loader with a standard location)


#: Fashion-MNIST's folder in Debian's dataset-fashion-mnist package (`dpkg -L dataset-fashion-mnist`)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST's labels 0..9 (Xiao et al. 2017, Table 1)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 NCHW images resized to size x size with antialiasing (bilinear, the area each output
    pixel covers averaged in), rounded back to uint8."""
    import torch.nn.functional as F

    if images.shape[-1] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _idx_loader(class_names: tuple[str, ...] | None, hint: str):
    """A loader for a folder of the four MNIST-style idx files (gen/data/idx.py); option size."""
    def load(parsed: ParsedSpec, spec: str) -> LoadedDataset:
        from tailforge.gen.data.idx import IDX_FILES, read_idx_split

        root = Path(parsed.path).expanduser()
        if not root.is_dir():
            files = ", ".join(f"{stem}[.gz]" for pair in IDX_FILES.values() for stem in pair)
            raise DatasetError(f"dataset path not found: {root} (from spec {spec!r}). {hint} It must hold {files}.")
        size = _int_option(parsed, spec, "size", 0, minimum=0) or None
        splits = {}
        for split in SPLITS:
            images, labels = read_idx_split(root, split)
            images = torch.from_numpy(images)
            splits[split] = (resize_images(images, size) if size else images, torch.from_numpy(labels),
                             _index_keys(f"{parsed.name}-{split}", len(labels)))
        num_classes = int(max(int(t[1].max()) for t in splits.values()) + 1)
        names = class_names if class_names and len(class_names) >= num_classes else tuple(map(str, range(num_classes)))
        return LoadedDataset(splits, names, False)

    return load


_PROCEDURAL_OPTIONS = ("size", "channels", "train", "test", "seed")


DATASETS: dict[str, DatasetLoader] = {
    "digits": DatasetLoader(_load_digits, needs_path=False),
    "mondrian": DatasetLoader(_procedural(mondrian_images, "mondrian"), False, _PROCEDURAL_OPTIONS),
    "gm": DatasetLoader(_procedural(gaussian_mixture_images, "gm"), False, _PROCEDURAL_OPTIONS),
    "ri": DatasetLoader(_procedural(random_ink_images, "ri"), False, _PROCEDURAL_OPTIONS),
    "cifar10": DatasetLoader(_load_cifar10, needs_path=True),
    "imagefolder": DatasetLoader(_load_imagefolder, needs_path=True, options=("size",)),
    "shards": DatasetLoader(_load_shards, needs_path=True, options=("skip_bad_shards", "verify")),
    "fashion-mnist": DatasetLoader(_idx_loader(FASHION_MNIST_CLASSES, "Install Debian's dataset-fashion-mnist "
                                               "(apt-get install dataset-fashion-mnist) or give fashion-mnist:PATH."),
                                   needs_path=True, options=("size",), default_path=FASHION_MNIST_DIR),
    "mnist": DatasetLoader(_idx_loader(None, "Give the folder of MNIST-style idx files (MNIST, KMNIST, or "
                                             "torchvision's MNIST/raw)."), needs_path=True, options=("size",)),
}


def load_dataset(spec: str, split: str = "train") -> LabeledImages:
    """Load one split of the dataset named by `spec` into memory."""
    parsed = parse_spec(spec)
    loaded = DATASETS[parsed.name].load(parsed, spec)
    splits, class_names = loaded.splits, loaded.class_names
    if split not in splits:
        raise DatasetError(f"dataset {spec!r} has no {split!r} split; it has {sorted(splits)}")
    images, labels, keys = splits[split]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise DatasetError(f"dataset {spec!r} gives images of shape {tuple(images.shape[1:])}; expected C x N x N with C in (1, 3)")
    info = DatasetInfo(spec=spec, image_size=int(images.shape[-1]), channels=int(images.shape[1]),
                       num_classes=len(class_names), class_names=class_names, flip_augment=loaded.flip_augment)
    data = LabeledImages(images=images, labels=labels, keys=keys, info=info, split=split,
                         read_report=loaded.read_report)
    if "n" in parsed.options and split == "train":
        n = _int_option(parsed, spec, "n", len(data))
        if n > len(data):
            raise DatasetError(f"option n={n} in dataset spec {spec!r} exceeds the {len(data)} training images")
        order = np.random.default_rng(_int_option(parsed, spec, "subset_seed", 0, minimum=0)).permutation(len(data))
        data = data.subset(np.sort(order[:n]))
    return data
