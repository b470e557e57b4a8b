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
    storage = Storage(root)
    where = storage.url(INFO_FILE)
    info = _read_json(storage, INFO_FILE, "shard manifest")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not splits:
        raise ShardError(f"{where} has no 'splits' (expected timm's layout: splits -> name, num_samples, filenames, shard_lengths)")
    for name, split in splits.items():
        if not isinstance(split, dict):
            raise ShardError(f"{where}: split {name!r} is not an object")
        missing = [k for k in ("num_samples", "filenames") if k not in split]
        if missing:
            raise ShardError(f"{where}: split {name!r} lacks {missing}")
        filenames = split["filenames"]
        if not isinstance(filenames, list) or not all(isinstance(f, str) and f for f in filenames):
            raise ShardError(f"{where}: split {name!r}: 'filenames' must be a list of file names")
        for key in ("shard_lengths", "shard_sha256"):
            if key in split and (not isinstance(split[key], list) or len(split[key]) != len(filenames)):
                raise ShardError(f"{where}: split {name!r}: {key!r} must list one entry per file name "
                                 f"({len(filenames)})")
        if any(f.startswith("/") or ".." in posixpath.normpath(f).split("/") for f in filenames):
            raise ShardError(f"{where}: split {name!r} names a shard outside the folder (absolute or '..')")
    return info


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One shard of a split as the manifest describes it."""

    url: str  # path or URL of the tar file
    count: int | None  # samples per the manifest's shard_lengths (None when it has none)
    sha256: str | None  # digest per the manifest (or the shard's record), None when unknown


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
    return [ShardEntry(storage.url(n), None if c is None else int(c), d) for n, c, d in zip(names, counts, digests)]


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


def decode_sample(url: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample to the reader's dict: key, image (uint8 CHW), label, meta."""
    key, offset = raw["__key__"], raw.get("__offset__", "?")
    where = f"shard {url}: sample {key!r} at byte offset {offset}"
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None or "cls" not in raw:
        missing = [m for m, ok in (("png|jpg", image_ext), ("cls", "cls" in raw)) if not ok]
        raise ShardError(f"{where} lacks {missing} (it has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        image = decode_image(raw[image_ext]).numpy()
    except ShardError as err:
        raise ShardError(f"{where}: cannot decode its {image_ext}: {err}") from None
    try:
        label = int(raw["cls"])
    except ValueError:
        raise ShardError(f"{where}: label {raw['cls'][:20]!r} is not an integer") from None
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where}: its json is not valid: {err}") from None
    return {"key": key, "image": image, "label": label, "meta": meta}


def read_shard(url: str, *, count: int | None = None, sha256: str | None = None) -> list[dict[str, Any]]:
    """Read and check one whole shard; returns its decoded samples (key, image, label, meta).

    Raises ShardError naming the shard and byte offset if the tar is damaged, holds other than
    `count` samples (when given), a sample cannot be decoded, or its sha256 differs from `sha256`
    (when given)."""
    data = read_shard_bytes(url)
    samples = [decode_sample(url, raw) for raw in tar_samples(url, data)]
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
            samples = read_shard(entry.url, count=entry.count, sha256=entry.sha256 if verify else None)
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
