"""Writing a shard set: one TarWriter per planned shard, atomic publish, then its record; the manifest last."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from tailforge.gen.core.errors import ShardError, StorageError
from tailforge.gen.core.files import json_text
from tailforge.gen.data.shards.format import (
    INFO_FILE,
    JOB_FILE,
    RECORDS_DIR,
    ShardRecord,
    ShardSpec,
)
from tailforge.gen.data.storage import LOCK_FILE, Storage, is_url


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
    Storage(root).write_json(record_name(record.name), dataclasses.asdict(record))


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


def job_files(specs: Iterable[ShardSpec]) -> list[str]:
    """Every file a job with these planned shards writes (names relative to its folder): its
    shards, their records, the job file and the manifest. The job deletes nothing else, and only
    the publish temporaries of these names."""
    names = [JOB_FILE, INFO_FILE]
    for spec in specs:
        names += [spec.name, record_name(spec.name)]
    return names


def record_name(shard: str) -> str:
    """Where the record of shard `shard` lives."""
    return f"{RECORDS_DIR}/{Path(shard).stem}.json"


def differing_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two nested JSON objects (a field
    one side lacks counts: a job made by an older version without a newer setting)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += differing_fields(a, b, f"{prefix}{key}.")
        elif key not in old or key not in new or a != b:
            names.append(f"{prefix}{key}")
    return names


def check_job_folder(root: str | os.PathLike, job_config: dict[str, Any], planned: Iterable[str], *,
                     force: bool = False) -> bool:
    """Refuse an output folder that is not this job's own; True when it is (its `_job.json` is
    this job's), False for a folder the job may take: missing, empty, or (``force``) one whose
    files the job will leave alone. Reads only, so a refused folder is left exactly as it was.

    Refused: another job's `_job.json` (even with ``force``: its shards are not this job's to
    complete or replace), a job whose pinned inputs changed (``job_config["pins"]``: content
    hashes by config field), a non-empty folder without `_job.json` unless ``force``, and (with
    ``force``) any file the job would write that exists already (a user's file with a shard's
    name)."""
    storage = Storage(root)
    if storage.is_file(""):
        raise ShardError(f"cannot use {storage.url()} as an output folder: it exists and is not a folder")
    if storage.exists(JOB_FILE):
        existing = _read_json(storage, JOB_FILE, "job file")
        if existing == job_config:
            return True
        if not isinstance(existing, dict):
            raise ShardError(f"{storage.url(JOB_FILE)} is not a job file (a JSON object); use a new --out folder")
        _refuse_changed_pins(storage, existing, job_config)
        changed = differing_fields(existing, job_config)
        raise ShardError(
            f"{root} already holds a different job (fields that differ: {', '.join(changed)}); "
            "use a new --out folder, or the same settings to resume")
    present = [name for name in storage.entries() if name != LOCK_FILE]
    if present and not force:
        raise ShardError(f"{storage.url()} is not empty and holds no {JOB_FILE} ({', '.join(present[:3])}"
                         f"{' ...' if len(present) > 3 else ''}): it is not this job's folder; use a new or empty "
                         "--out, or --force to write the job's files next to these (none of them is touched)")
    taken = [name for name in planned if storage.exists(name)] if present else []
    if taken:
        raise ShardError(f"{storage.url(taken[0])} exists and is not this job's: the job would write a file of that "
                         "name; move it away or use another --out")
    return False


def _refuse_changed_pins(storage: Storage, existing: dict[str, Any], job_config: dict[str, Any]) -> None:
    """A resume whose pinned input (a model or guidance folder, by content hash) changed would mix
    two inputs in one shard set."""
    before, now = existing.get("pins") or {}, job_config.get("pins") or {}
    for field in sorted(now):
        if field in before and before[field] != now[field]:
            raise ShardError(
                f"the {field} {job_config.get(field)} changed since the job in {storage.url()} started (content hash "
                f"{before[field]} then, {now[field]} now): its shards would come from two {field}s; use a new --out "
                f"for the new {field}, or restore the original {field} to resume")


def pin_job(root: str | os.PathLike, job_config: dict[str, Any]) -> str | Path:
    """Pin the job config in `_job.json`: created exclusively and never replaced (a driver that
    lost the race to create it must find it equal). Call it after :func:`check_job_folder`, under
    the folder's lock. Returns the folder (a Path for local folders, the URL string otherwise)."""
    storage = Storage(root)
    if not storage.exists(JOB_FILE):
        try:
            storage.write_json(JOB_FILE, job_config, replace=False)
        except FileExistsError:
            pass
    if _read_json(storage, JOB_FILE, "job file") != job_config:
        raise ShardError(f"{storage.url(JOB_FILE)} was written by another driver at the same time; use a new --out")
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
    storage = Storage(root)
    # a finished job re-run writes nothing (it works on read-only storage)
    if not storage.is_file(INFO_FILE) or storage.read_bytes(INFO_FILE) != json_text(info, INFO_FILE).encode("utf-8"):
        storage.write_json(INFO_FILE, info)
    return info
