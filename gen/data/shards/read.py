"""Reading shard sets: manifest, entries, whole-shard checked reads, webdataset pipelines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
from typing import Any, Iterator

import fsspec
import webdataset as wds
from torch import Tensor

from tailforge.gen.core.errors import ShardError, StorageError
from tailforge.gen.core.images import decode_image
from tailforge.gen.data.shards.format import (
    IMAGE_EXTENSIONS,
    INFO_FILE,
)
from tailforge.gen.data.shards.tar import (
    tar_samples,
)
from tailforge.gen.data.shards.write import (
    _read_json,
    load_records,
)
from tailforge.gen.data.storage import Storage, is_url

log = logging.getLogger(__name__)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The shard set's timm-style manifest, every field checked (see :func:`_check_split`): a
    malformed one is a ShardError naming the manifest, the split, the field and its value."""
    storage = Storage(root)
    where = storage.url(INFO_FILE)
    info = _read_json(storage, INFO_FILE, "shard manifest")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not splits:
        raise ShardError(f"{where} has no 'splits' (expected timm's layout: splits -> name, num_samples, filenames, shard_lengths)")
    num_classes = info.get("num_classes")
    if num_classes is not None and not (is_count(num_classes) and num_classes >= 1):
        raise ShardError(f"{where}: 'num_classes' is {num_classes!r}; expected an integer >= 1")
    class_names = info.get("class_names")
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)
                                        and (num_classes is None or len(class_names) == num_classes)):
        raise ShardError(f"{where}: 'class_names' is {str(class_names)[:80]}; expected a list of {num_classes} names")
    listed: dict[str, str] = {}  # shard file -> the split that lists it
    for name, split in splits.items():
        _check_split(where, name, split)
        for filename in split["filenames"]:
            if filename in listed:
                raise ShardError(f"{where}: shard {filename!r} is listed twice (in split {listed[filename]!r} and "
                                 f"{name!r}); its samples would be read twice")
            listed[filename] = name
    return info


def is_count(value: Any) -> bool:
    """Whether a manifest or record field is a count: an integer >= 0 (JSON true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_safe_shard_name(name: Any) -> bool:
    """Whether a shard file name from a manifest or record stays inside the set's folder: a
    relative path with no '..', no URL, backslash or NUL."""
    return (isinstance(name, str) and bool(name) and not name.startswith("/") and name[1:2] != ":"
            and "://" not in name and "\\" not in name and "\0" not in name
            and ".." not in posixpath.normpath(name).split("/"))


def _check_split(where: str, name: str, split: Any) -> None:
    """One split of a manifest: ``num_samples`` an integer >= 0, ``filenames`` a list of shard file
    names relative to the set's folder (no absolute path or URL, no '..', backslash or NUL: a manifest
    must not point readers at files outside its folder), ``shard_lengths`` (optional) one integer
    >= 0 per file summing to ``num_samples``, ``shard_sha256`` (optional) one hex digest or null
    per file."""
    if not isinstance(split, dict):
        raise ShardError(f"{where}: split {name!r} is not an object")
    missing = [k for k in ("num_samples", "filenames") if k not in split]
    if missing:
        raise ShardError(f"{where}: split {name!r} lacks {missing}")
    num_samples, filenames = split["num_samples"], split["filenames"]
    if not is_count(num_samples):
        raise ShardError(f"{where}: split {name!r}: 'num_samples' is {num_samples!r}; expected an integer >= 0")
    if not isinstance(filenames, list):
        raise ShardError(f"{where}: split {name!r}: 'filenames' is {str(filenames)[:80]}; expected a list of file names")
    for i, filename in enumerate(filenames):
        if not isinstance(filename, str) or not filename:
            raise ShardError(f"{where}: split {name!r}: 'filenames' entry {i} is {filename!r}; expected a file name")
        if not is_safe_shard_name(filename):
            raise ShardError(f"{where}: split {name!r} names a shard outside the folder: 'filenames' entry {i} is "
                             f"{filename!r} (absolute, a URL, '..', backslash or NUL)")
    for key in ("shard_lengths", "shard_sha256"):
        if key in split and (not isinstance(split[key], list) or len(split[key]) != len(filenames)):
            raise ShardError(f"{where}: split {name!r}: {key!r} must list one entry per file name "
                             f"({len(filenames)}), got {str(split[key])[:80]}")
    lengths = split.get("shard_lengths")
    if lengths is not None:
        for filename, length in zip(filenames, lengths):
            if not is_count(length):
                raise ShardError(f"{where}: split {name!r}: 'shard_lengths' of {filename!r} is {length!r}; "
                                 "expected an integer >= 0")
        if sum(lengths) != num_samples:
            raise ShardError(f"{where}: split {name!r}: 'num_samples' is {num_samples} but 'shard_lengths' sum to "
                             f"{sum(lengths)}")
    for filename, digest in zip(filenames, split.get("shard_sha256") or ()):
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            raise ShardError(f"{where}: split {name!r}: 'shard_sha256' of {filename!r} is {str(digest)[:80]!r}; "
                             "expected 64 lowercase hex digits or null")


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One shard of a split as the manifest describes it."""

    url: str  # path or URL of the tar file
    count: int | None  # samples per the manifest's shard_lengths (None when it has none)
    sha256: str | None  # digest per the manifest (or the shard's record), None when unknown
    num_classes: int | None = None  # labels must lie in [0, num_classes) (the manifest's; None: any integer >= 0)


def shard_entries(root: str | os.PathLike, split: str = "train") -> list[ShardEntry]:
    """The shards of a split with their expected sample counts and digests. Digests come from the
    manifest's ``shard_sha256`` or, for older manifests, from the shard records."""
    storage = Storage(root)
    info = read_manifest(root)
    if split not in info["splits"]:
        raise ShardError(f"{storage.url(INFO_FILE)} has no split {split!r}; it has {sorted(info['splits'])}")
    entry = info["splits"][split]
    names = entry["filenames"]
    counts = entry.get("shard_lengths") or [None] * len(names)
    digests = entry.get("shard_sha256")
    if digests is None:
        by_name = {r.name: r.sha256 for r in load_records(root).values()}
        digests = [by_name.get(n) for n in names]
    return [ShardEntry(storage.url(n), c, d, info.get("num_classes")) for n, c, d in zip(names, counts, digests)]


@dataclasses.dataclass
class ShardReadStats:
    """What a reader saw, for logs and reports. Counted in the process that iterates (with a
    DataLoader, each worker process has its own copy)."""

    shards_read: int = 0  # shards read and checked
    samples: int = 0  # samples yielded
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"shard", "error"} per skipped shard

    def as_dict(self) -> dict[str, Any]:
        return {"shards_read": self.shards_read, "shards_skipped": len(self.skipped), "samples": self.samples,
                "skipped": list(self.skipped)}


def read_shard_bytes(url: str) -> bytes:
    """The whole shard file at a path or URL."""
    try:
        with _open(url) as f:
            return f.read()
    except FileNotFoundError:
        raise ShardError(f"shard {url} not found (listed in the manifest but missing)") from None
    except (OSError, StorageError) as err:
        raise ShardError(f"shard {url} cannot be read: {err}") from None


def _open(url: str):
    if not is_url(url):
        return open(url, "rb")
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {url}: {err}") from None


def sample_location(url: str, raw: dict[str, Any]) -> str:
    """Where a raw sample (from :func:`tar_samples`) is, for error messages."""
    return f"shard {url}: sample {raw['__key__']!r} at byte offset {raw.get('__offset__', '?')}"


def parse_label(url: str, raw: dict[str, Any], num_classes: int | None) -> int:
    """A raw sample's ``cls`` member as its class: ASCII decimal digits only (``int()`` would also
    take ``-1``, `` 3``, ``3_0`` and non-ASCII digits) and below ``num_classes`` when that is known.
    The one label check of every reader: decode_sample, ``shards verify`` and the training stream."""
    data = raw["cls"]
    if not data.isdigit() or len(data) > 18:  # bytes.isdigit: ASCII 0-9 only, empty is False; 18 digits fit int64
        raise ShardError(f"{sample_location(url, raw)}: label {data[:20]!r} is not an integer "
                         "(up to 18 decimal digits only)")
    label = int(data)
    if num_classes is not None and label >= num_classes:
        raise ShardError(f"{sample_location(url, raw)}: label {label} is not below num_classes {num_classes}")
    return label


def decode_sample_image(url: str, raw: dict[str, Any]) -> Tensor:
    """A raw sample's image as uint8 CHW, through the one capped decoder (gen.core.images.decode_image)."""
    image_ext = "png" if "png" in raw else next((e for e in IMAGE_EXTENSIONS if e in raw), None)  # png: what we write
    if image_ext is None:
        raise ShardError(f"{sample_location(url, raw)} lacks ['png|jpg'] (it has "
                         f"{sorted(k for k in raw if not k.startswith('__'))})")
    try:
        return decode_image(raw[image_ext])
    except ShardError as err:
        raise ShardError(f"{sample_location(url, raw)}: cannot decode its {image_ext}: {err}") from None


def decode_sample(url: str, raw: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """A raw sample to the reader's dict: key, image (uint8 CHW), label (checked against
    `num_classes` when given), meta."""
    if not any(e in raw for e in IMAGE_EXTENSIONS) or "cls" not in raw:
        missing = [m for m, ok in (("png|jpg", any(e in raw for e in IMAGE_EXTENSIONS)), ("cls", "cls" in raw)) if not ok]
        raise ShardError(f"{sample_location(url, raw)} lacks {missing} (it has "
                         f"{sorted(k for k in raw if not k.startswith('__'))})")
    image = decode_sample_image(url, raw).numpy()
    label = parse_label(url, raw, num_classes)
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ShardError(f"{sample_location(url, raw)}: its json is not valid: {type(err).__name__}: "
                         f"{str(err)[:80]}") from None
    return {"key": raw["__key__"], "image": image, "label": label, "meta": meta}


def read_shard(url: str, *, count: int | None = None, sha256: str | None = None,
               num_classes: int | None = None) -> list[dict[str, Any]]:
    """Read and check one whole shard; returns its decoded samples (key, image, label, meta).

    Raises ShardError naming the shard and byte offset if the tar is damaged, holds other than
    `count` samples (when given), a sample cannot be decoded or has a label that is not a decimal
    integer below `num_classes`, or its sha256 differs from `sha256` (when given)."""
    data = read_shard_bytes(url)
    samples = [decode_sample(url, raw, num_classes) for raw in tar_samples(url, data)]
    if count is not None and len(samples) != count:
        raise ShardError(f"shard {url}: holds {len(samples)} samples, the manifest says {count} "
                         f"(file ends at byte offset {len(data)})")
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ShardError(f"shard {url}: sha256 {actual[:16]}... differs from the recorded {sha256[:16]}... "
                             f"({len(data)} bytes; the content changed after it was written)")
    return samples


def _checked_samples(source: Iterator[dict[str, Any]], entries: dict[str, ShardEntry], *, verify: bool,
                     skip_bad_shards: bool, stats: ShardReadStats) -> Iterator[dict[str, Any]]:
    """Pipeline stage: {"url"} dicts in, decoded samples out, one whole checked shard at a time."""
    for item in source:
        entry = entries[item["url"]]
        if verify and entry.sha256 is None:
            raise ShardError(f"shard {entry.url}: verify was asked but neither the manifest nor a record "
                             "gives its sha256")
        try:
            samples = read_shard(entry.url, count=entry.count, sha256=entry.sha256 if verify else None,
                                 num_classes=entry.num_classes)
        except ShardError as err:
            if not skip_bad_shards:
                raise
            stats.skipped.append({"shard": entry.url, "error": str(err)})
            log.warning("skipping bad shard (%d skipped so far): %s", len(stats.skipped), err)
            continue
        stats.shards_read += 1
        for sample in samples:
            stats.samples += 1
            yield sample


def shard_pipeline(root: str | os.PathLike, split: str = "train", *, shuffle: int = 0, seed: int = 0,
                   skip_bad_shards: bool = False, verify: bool = False,
                   stats: ShardReadStats | None = None) -> wds.FluidWrapper:
    """A webdataset pipeline over a shard set's split (a path or URL), yielding dicts (key, image
    uint8 CHW, label, meta); ``.shuffle``, ``.map``, ``.batched`` etc. chain as usual.

    shuffle: > 0 shuffles shards and samples (buffer of that many samples), seeded by `seed`.
    skip_bad_shards: a damaged shard (see :func:`read_shard`) is skipped whole, logged as a warning
        and appended to ``stats.skipped``; without it the first damaged shard raises a ShardError
        naming the shard and byte offset. Every shard is checked whole before any of its samples
        is yielded, so a shard is never half-read.
    verify: also compare each shard's sha256 with the manifest (or its record).
    stats: a ShardReadStats to count into (read it after iterating, for a report).
    """
    entries = {e.url: e for e in shard_entries(root, split)}
    stats = stats if stats is not None else ShardReadStats()
    stages: list[Any] = [wds.SimpleShardList(list(entries)), wds.shardlists.single_node_only,
                         wds.shardlists.split_by_worker]
    if shuffle:
        stages.append(wds.filters.shuffle(len(entries), initial=len(entries), seed=seed))
    stages.append(wds.filters.pipelinefilter(_checked_samples)(entries, verify=verify, skip_bad_shards=skip_bad_shards,
                                                               stats=stats))
    if shuffle:
        stages.append(wds.filters.shuffle(shuffle, seed=seed + 1))
    pipeline = wds.FluidWrapper(stages[0])
    for stage in stages[1:]:
        pipeline.append(stage)
    pipeline.stats = stats
    return pipeline


def iter_samples(root: str | os.PathLike, split: str = "train", *, skip_bad_shards: bool = False,
                 verify: bool = False, stats: ShardReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of a split, in shard order (options as in :func:`shard_pipeline`)."""
    yield from shard_pipeline(root, split, skip_bad_shards=skip_bad_shards, verify=verify, stats=stats)
