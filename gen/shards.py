"""WebDataset shards: planned up front, written atomically, recorded, described by a timm manifest.

Layout of a shard set folder (a local path or any fsspec URL: ``file://``, ``s3://``, ``gs://``;
see gen/storage.py for how each is published atomically):

    OUT/_job.json                    the job's config and plan (a re-run must match it)
    OUT/{job}-{index:06d}.tar        one shard per ShardSpec, written by one TarWriter
    OUT/_records/{job}-{index:06d}.json   a ShardRecord, written after the shard is in place
    OUT/_info.json                   timm's WebDataset manifest (splits -> name, num_samples,
                                     filenames, shard_lengths, and our shard_sha256) plus
                                     num_classes / class_names and what the job planned

A shard is written to a temporary name, fsynced and renamed (an object store: uploaded in one
PUT); only then is its record written. A shard without a record does not exist for readers and is
redone on the next run; a record is the proof that the shard with that sha256 is complete. Each
sample is

    __key__  {job}-{global_index:09d}
    png      uint8 image (L for one channel, RGB for three)
    cls      the class label as ASCII digits
    json     provenance: sampler settings, sigma/t, seed, model hash, scores (per job kind)

Readers (:func:`shard_pipeline`, :func:`iter_samples`, :func:`read_shard`) read a shard whole and
check it before yielding any of its samples: tar structure, member names (absolute paths, ``..``
and links are refused), the end-of-archive marker, the sample count against the manifest and,
when asked (``verify=True``), the sha256 against the manifest/record. A bad shard raises a
ShardError naming the shard and the byte offset, or with ``skip_bad_shards=True`` is skipped
whole, logged and counted in a :class:`ShardReadStats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .errors import TailforgeError
from .storage import Storage, StorageError, is_url

INFO_FILE = "_info.json"
JOB_FILE = "_job.json"
RECORDS_DIR = "_records"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # the image member of a sample, first found wins

log = logging.getLogger(__name__)


class ShardError(TailforgeError):
    """A shard set or shard that cannot be written or read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """The plan for one shard: which samples it holds and how they are made."""

    job: str  # job name, the prefix of shard and sample keys
    index: int  # shard number within the job
    start: int  # global index of the shard's first sample
    count: int  # number of samples in the shard
    seed: int  # job seed; sample i's noise comes from (seed, start + i)

    @property
    def name(self) -> str:
        return f"{self.job}-{self.index:06d}.tar"

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.count)


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """The outcome of writing one shard: proof that it is complete, and what it cost."""

    name: str  # file name of the shard inside the shard set
    index: int  # shard number
    start: int  # global index of its first sample
    count: int  # samples written
    sha256: str  # digest of the whole tar file
    size_bytes: int  # tar file size
    seconds: float  # wall time to produce and write it
    model_evals: int  # denoiser evaluations (batch rows x calls) spent on it
    worker: str  # which actor/process wrote it


def sample_key(job: str, index: int) -> str:
    return f"{job}-{index:09d}"


def plan_shards(job: str, num_samples: int, shard_size: int, seed: int) -> list[ShardSpec]:
    """Split `num_samples` into shards of `shard_size` (the last may be smaller)."""
    if num_samples < 1:
        raise ShardError(f"number of samples must be >= 1, got {num_samples}")
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    # No '.': webdataset (and timm) split a member name into key and extension at the first dot,
    # so a dotted job name would cut every sample key short.
    if not job or not all(c.isalnum() or c in "_-" for c in job):
        raise ShardError(f"job name {job!r} must be non-empty and use only letters, digits, '_' and '-'")
    return [ShardSpec(job=job, index=i, start=start, count=min(shard_size, num_samples - start), seed=seed)
            for i, start in enumerate(range(0, num_samples, shard_size))]


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


def encode_sample(key: str, image_hwc: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": key,
        "png": encode_png(image_hwc),
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8"),
    }


# ------------------------------------------------------------------------------------------------
# Writing


def write_shard(root: str | os.PathLike, spec: ShardSpec, samples: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """Write encoded samples (see :func:`encode_sample`) as shard `spec.name` under `root` (a path or URL).

    The tar goes to a unique temporary file first and is published atomically (local: fsync +
    rename; object store: one upload of the finished file), so a reader or a re-run never sees a
    partial shard, and two writers of the same spec (a retried task racing its original) each
    publish a complete file. Returns (sha256, size in bytes).
    """

    def write(f) -> None:
        written = 0
        # mtime fixed so the tar bytes depend only on the samples (reproducible sha256).
        with wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for sample in samples:
                writer.write(sample)
                written += 1
        if written != spec.count:
            raise ShardError(f"shard {spec.name}: produced {written} samples, planned {spec.count}")

    sha256, size, _ = Storage(root).publish(spec.name, write)
    return sha256, size


def record_path(root: str | os.PathLike, name: str) -> str | Path:
    """Where the record of shard `name` lives (a Path for local folders, a URL otherwise)."""
    location = Storage(root).url(f"{RECORDS_DIR}/{Path(name).stem}.json")
    return location if is_url(str(root)) else Path(location)


def save_record(root: str | os.PathLike, record: ShardRecord) -> None:
    """Publish a shard's record (atomically); from now on the shard counts as done."""
    Storage(root).write_json(f"{RECORDS_DIR}/{Path(record.name).stem}.json", dataclasses.asdict(record))


def load_records(root: str | os.PathLike) -> dict[int, ShardRecord]:
    """Records of the shards already complete under `root`, by shard index."""
    storage = Storage(root)
    records = {}
    for name in storage.list(RECORDS_DIR, suffix=".json"):
        raw = _read_json(storage, f"{RECORDS_DIR}/{name}", "shard record")
        try:
            record = ShardRecord(**raw)
        except TypeError as err:
            raise ShardError(f"shard record {storage.url(f'{RECORDS_DIR}/{name}')} has unexpected fields: {err}") from None
        records[record.index] = record
    return records


def _read_json(storage: Storage, name: str, what: str) -> Any:
    try:
        return storage.read_json(name, what)
    except StorageError as err:
        raise ShardError(str(err)) from None


def prepare_job_folder(root: str | os.PathLike, job_config: dict[str, Any]) -> str | Path:
    """Create the output folder and pin the job config; refuse to mix two different jobs in one folder.
    Returns the folder (a Path for local folders, the URL string otherwise)."""
    storage = Storage(root)
    try:
        storage.makedirs()
    except (StorageError, OSError) as err:
        raise ShardError(f"cannot use {root} as an output folder: {err}") from None
    if storage.exists(JOB_FILE):
        existing = _read_json(storage, JOB_FILE, "job file")
        if existing != job_config:
            changed = sorted(k for k in set(existing) | set(job_config) if existing.get(k) != job_config.get(k))
            raise ShardError(
                f"{root} already holds a different job (fields that differ: {', '.join(changed)}); "
                "use a new --out folder, or the same settings to resume")
    else:
        storage.write_json(JOB_FILE, job_config)
    return root if is_url(str(root)) else Path(root)


def write_manifest(root: str | os.PathLike, records: Iterable[ShardRecord], *, split: str = "train",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `_info.json` in timm's WebDataset layout (timm.data.readers.reader_wds) for the
    recorded shards, in shard order, so timm and plain webdataset read them without our code.
    ``shard_sha256`` (ignored by timm) lets readers verify shards from the manifest alone."""
    ordered = sorted(records, key=lambda r: r.index)
    info = dict(extra or {})
    info["splits"] = {split: {
        "name": split,
        "num_samples": sum(r.count for r in ordered),
        "filenames": [r.name for r in ordered],
        "shard_lengths": [r.count for r in ordered],
        "shard_sha256": [r.sha256 for r in ordered],
    }}
    Storage(root).write_json(INFO_FILE, info)
    return info


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


def shard_urls(root: str | os.PathLike, split: str = "train") -> list[str]:
    return [e.url for e in shard_entries(root, split)]


# ------------------------------------------------------------------------------------------------
# Reading, with checks


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


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (old-style, POSIX, contiguous)
_SKIPPED = (b"5", b"g", b"K")  # directory, global pax header, GNU long link name: carry no sample data
_LINKS = (b"1", b"2")  # hard link, symbolic link


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    """The "path" record of a pax extended header ("LEN path=VALUE\n" records)."""
    path = None
    while data:
        length, _, _ = data.partition(b" ")
        record, data = data[:int(length)], data[int(length):]
        key, _, value = record[len(length) + 1:-1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
    return path


def _check_member_name(url: str, name: str, offset: int) -> None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ShardError(f"shard {url}: member {name!r} at byte offset {offset} has an absolute path; refused")
    if ".." in name.replace("\\", "/").split("/"):
        raise ShardError(f"shard {url}: member {name!r} at byte offset {offset} contains '..'; refused")


def tar_members(url: str, data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, byte offset of its first header, payload) of every regular file of a whole tar shard.

    Hand-written rather than ``tarfile``: tarfile decodes every header field in pure Python, which on
    8x8 images was about 3/4 of the training pipeline's time (`tailforge bench stream`, about 70x this
    parser's cost), and it stops silently at a corrupt header in the middle of a file. This reads the
    POSIX ustar/pax layout that tarfile and webdataset's TarWriter write (pax "path" records, GNU
    long names, ustar prefixes) and checks everything: header checksums, truncation, unsafe names
    (absolute paths, '..'), links and special files (refused), and that only zeros follow the
    end-of-archive marker. Every problem is a ShardError naming the shard and the byte offset.
    """
    position, member_start, long_name = 0, 0, None
    while True:
        header = data[position:position + _BLOCK]
        if len(header) < _BLOCK:
            where = "before the end-of-archive marker" if not header else f"inside the tar header at byte offset {position}"
            raise ShardError(f"shard {url}: unreadable tar data at byte offset {len(data)}: unexpected end of data "
                             f"({where})")
        if not any(header):
            trailer = data[position:]
            if any(trailer):
                raise ShardError(f"shard {url}: corrupt or truncated tar header at byte offset {position} "
                                 f"({len(trailer)} bytes after it are not an end-of-archive marker)")
            if len(trailer) < 2 * _BLOCK:
                raise ShardError(f"shard {url}: unreadable tar data at byte offset {len(data)}: unexpected end of data "
                                 "(inside the end-of-archive marker)")
            return
        try:
            checksum_ok = _octal(header[148:156]) == sum(header[:148]) + 8 * 32 + sum(header[156:])
            size = _octal(header[124:136])
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise ShardError(f"shard {url}: corrupt or truncated tar header at byte offset {position} "
                             "(header checksum mismatch)")
        if long_name is None:
            member_start = position
        payload_at = position + _BLOCK
        payload = data[payload_at:payload_at + size]
        kind = header[156:157]
        name = long_name or header[:100].rstrip(b"\0").decode("utf-8", "replace")
        if header[257:262] == b"ustar" and not long_name:
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        if len(payload) < size:
            raise ShardError(f"shard {url}: unreadable tar data at byte offset {len(data)}: unexpected end of data "
                             f"(inside member {name!r}, header at byte offset {member_start}, "
                             f"{size - len(payload)} bytes missing)")
        position = payload_at + -(-size // _BLOCK) * _BLOCK
        if kind == b"x":
            long_name = _pax_path(payload) or long_name
            continue
        if kind == b"L":
            long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
            continue
        long_name = None
        _check_member_name(url, name, member_start)
        if kind in _REGULAR:
            yield name, member_start, payload
        elif kind in _LINKS:
            raise ShardError(f"shard {url}: member {name!r} at byte offset {member_start} is a link; only regular "
                             "files are accepted")
        elif kind not in _SKIPPED:
            raise ShardError(f"shard {url}: member {name!r} at byte offset {member_start} is a special file; only "
                             "regular files are accepted")


def tar_samples(url: str, data: bytes) -> list[dict[str, Any]]:
    """Parse a whole tar shard (checked by :func:`tar_members`) into raw samples ({"__key__",
    "__offset__", ext: bytes}), grouping members by webdataset's key rule; a key that appears twice,
    or an extension repeated within a sample, is a ShardError too."""
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, offset, payload in tar_members(url, data):
        key, ext = base_plus_ext(name)
        if key is None:
            continue  # webdataset ignores members without an extension; so do we
        if not samples or samples[-1]["__key__"] != key:
            if key in seen:
                raise ShardError(f"shard {url}: key {key!r} appears twice (again at byte offset {offset})")
            seen.add(key)
            samples.append({"__key__": key, "__offset__": offset})
        if ext in samples[-1]:
            raise ShardError(f"shard {url}: member {name!r} at byte offset {offset} repeats "
                             f"extension {ext!r} of key {key!r}")
        samples[-1][ext] = payload
    return samples


def decode_sample(url: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample to the reader's dict: key, image (uint8 CHW), label, meta."""
    key, offset = raw["__key__"], raw.get("__offset__", "?")
    where = f"shard {url}: sample {key!r} at byte offset {offset}"
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None or "cls" not in raw:
        missing = [m for m, ok in (("png|jpg", image_ext), ("cls", "cls" in raw)) if not ok]
        raise ShardError(f"{where} lacks {missing} (it has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        image = decode_png(raw[image_ext])
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, broken PNG chunks / CRC
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
