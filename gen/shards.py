"""WebDataset shards: planned up front, written atomically, recorded, described by a timm manifest.

Layout of a shard set folder:

    OUT/_job.json                    the job's config and plan (a re-run must match it)
    OUT/{job}-{index:06d}.tar        one shard per ShardSpec, written by one TarWriter
    OUT/_records/{job}-{index:06d}.json   a ShardRecord, written after the shard is in place
    OUT/_info.json                   timm's WebDataset manifest (splits -> name, num_samples,
                                     filenames, shard_lengths) plus num_classes / class_names

A shard is written to a temporary name, fsynced and renamed; only then is its record written.
A shard without a record does not exist for readers and is redone on the next run; a record is
the proof that the shard with that sha256 is complete. Each sample is

    __key__  {job}-{global_index:09d}
    png      uint8 image (L for one channel, RGB for three)
    cls      the class label as ASCII digits
    json     provenance: sampler settings, sigma/t, seed, model hash, scores (per job kind)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from .checkpoint import read_json, write_json_atomic
from .errors import TailforgeError

INFO_FILE = "_info.json"
JOB_FILE = "_job.json"
RECORDS_DIR = "_records"


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
    if not job or not all(c.isalnum() or c in "_." for c in job):
        raise ShardError(f"job name {job!r} must be non-empty and use only letters, digits, '_' and '.'")
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
    """PNG bytes to uint8 CHW (the code-internal layout)."""
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(root: str | os.PathLike, spec: ShardSpec, samples: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """Write encoded samples (see :func:`encode_sample`) as shard `spec.name` under `root`.

    The tar goes to a unique temporary name first, is fsynced, then renamed into place, so a
    reader or a re-run never sees a partial shard, and two writers of the same spec (a retried
    task racing its original) each publish a complete file. Returns (sha256, size in bytes).
    """
    root = Path(root)
    final = root / spec.name
    tmp = root / f".{spec.name}.{uuid.uuid4().hex}.tmp"
    digest = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as f:
            # mtime fixed so the tar bytes depend only on the samples (reproducible sha256).
            with wds.TarWriter(f, encoder=False, mtime=0) as writer:
                for sample in samples:
                    writer.write(sample)
                    written += 1
            f.flush()
            os.fsync(f.fileno())
        if written != spec.count:
            raise ShardError(f"shard {spec.name}: produced {written} samples, planned {spec.count}")
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = tmp.stat().st_size
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def record_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / RECORDS_DIR / f"{Path(name).stem}.json"


def save_record(root: str | os.PathLike, record: ShardRecord) -> None:
    """Publish a shard's record (atomically); from now on the shard counts as done."""
    (Path(root) / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path(root, record.name), dataclasses.asdict(record))


def load_records(root: str | os.PathLike) -> dict[int, ShardRecord]:
    """Records of the shards already complete under `root`, by shard index."""
    folder = Path(root) / RECORDS_DIR
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        raw = read_json(path, "shard record")
        try:
            record = ShardRecord(**raw)
        except TypeError as err:
            raise ShardError(f"shard record {path} has unexpected fields: {err}") from None
        records[record.index] = record
    return records


def prepare_job_folder(root: str | os.PathLike, job_config: dict[str, Any]) -> Path:
    """Create the output folder and pin the job config; refuse to mix two different jobs in one folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    job_file = root / JOB_FILE
    if job_file.exists():
        existing = read_json(job_file, "job file")
        if existing != job_config:
            changed = sorted(k for k in set(existing) | set(job_config) if existing.get(k) != job_config.get(k))
            raise ShardError(
                f"{root} already holds a different job (fields that differ: {', '.join(changed)}); "
                "use a new --out folder, or the same settings to resume")
    else:
        write_json_atomic(job_file, job_config)
    return root


def write_manifest(root: str | os.PathLike, records: Iterable[ShardRecord], *, split: str = "train",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `_info.json` in timm's WebDataset layout (timm.data.readers.reader_wds) for the
    recorded shards, in shard order, so timm and plain webdataset read them without our code."""
    ordered = sorted(records, key=lambda r: r.index)
    info = dict(extra or {})
    info["splits"] = {split: {
        "name": split,
        "num_samples": sum(r.count for r in ordered),
        "filenames": [r.name for r in ordered],
        "shard_lengths": [r.count for r in ordered],
    }}
    write_json_atomic(Path(root) / INFO_FILE, info)
    return info


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / INFO_FILE
    info = read_json(path, "shard manifest")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not splits:
        raise ShardError(f"{path} has no 'splits' (expected timm's layout: splits -> name, num_samples, filenames, shard_lengths)")
    for name, split in splits.items():
        missing = [k for k in ("num_samples", "filenames") if k not in split]
        if missing:
            raise ShardError(f"{path}: split {name!r} lacks {missing}")
    return info


def shard_urls(root: str | os.PathLike, split: str = "train") -> list[str]:
    info = read_manifest(root)
    if split not in info["splits"]:
        raise ShardError(f"{Path(root) / INFO_FILE} has no split {split!r}; it has {sorted(info['splits'])}")
    return [str(Path(root) / name) for name in info["splits"][split]["filenames"]]


def _decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": raw["__key__"],
        "image": decode_png(raw["png"]),
        "label": int(raw["cls"]),
        "meta": json.loads(raw["json"]) if "json" in raw else {},
    }


def shard_pipeline(root: str | os.PathLike, split: str = "train", *, shuffle: int = 0,
                   seed: int = 0) -> wds.WebDataset:
    """A webdataset pipeline over a shard set's split, yielding dicts (key, image uint8 CHW,
    label, meta). ``shuffle`` > 0 shuffles shards and samples in a buffer of that size."""
    urls = shard_urls(root, split)
    pipeline = wds.WebDataset(urls, shardshuffle=bool(shuffle), empty_check=False, seed=seed)
    if shuffle:
        pipeline = pipeline.shuffle(shuffle)
    return pipeline.map(_decode_sample)


def iter_samples(root: str | os.PathLike, split: str = "train") -> Iterator[dict[str, Any]]:
    """Every sample of a split, in shard order."""
    yield from shard_pipeline(root, split)
