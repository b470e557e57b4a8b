"""Writing a shard set: one TarWriter per planned shard, atomic publish, then its record; the manifest last."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from tailforge.gen.core.errors import ShardError, StorageError
from tailforge.gen.data.shards.format import (
    INFO_FILE,
    JOB_FILE,
    RECORDS_DIR,
    ShardRecord,
    ShardSpec,
)
from tailforge.gen.data.storage import Storage, is_url


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
