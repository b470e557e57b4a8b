"""Generation jobs: plan, produce every unrecorded shard, record it, write the manifest.

A job is a list of ShardSpecs planned up front and a *source*: an object, built once per worker
by a picklable factory, whose ``samples(spec)`` yields the encoded samples of one shard and whose
``model_evals`` counts denoiser evaluations (gen/jobs/sources.py). The driver is the only writer
of records and of the manifest, so there is never a race on them. This module imports no Ray:
``actors=0`` runs the job in this process, anything else hands the pending shards to the actor
pool of gen/jobs/ray.py.

Exactly once, whatever dies (tests/test_faults.py kills actors and drivers at random points):

* a killed actor: see gen/jobs/ray.py (restarts, retries, replacement; a shard's bytes depend only
  on its spec, so a retry racing a late original publishes the same file);
* a killed driver: re-running the same command keeps every recorded shard whose file is present
  with the recorded size and sha256 and redoes the rest; temporaries of crashed writers of the
  job's own files are removed (nothing else is);
* a shard is published atomically (gen/data/storage.py) before its record, and only the driver
  writes records and the manifest, so no shard is half-written, duplicated or lost.

The output folder is the job's own: a non-empty folder without this job's `_job.json` is refused
(``force`` takes it, leaving every file already there alone), `_job.json` is created once and
never replaced, the content hashes of the inputs the job reads (``job_config["pins"]``: the model
and guidance folders) must match on every resume, and a local folder is locked for the whole run,
so a second driver is refused instead of deleting the first one's temporaries. An OSError (full
disk, read-only storage, no permission) ends the job with one line naming the path and what was
kept.

The output folder may be any fsspec URL (``s3://bucket/prefix``) that every node can reach.
"""

from __future__ import annotations

import collections
import functools
import os
import posixpath
import socket
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from tailforge.gen.core.errors import ConfigError, StorageError
from tailforge.gen.data.shards.format import ShardRecord, ShardSpec
from tailforge.gen.data.shards.write import (
    check_job_folder,
    job_files,
    load_records,
    pin_job,
    save_record,
    write_manifest,
)
from tailforge.gen.data.storage import Storage, os_error_message
from tailforge.gen.jobs.config import ShardJobConfig
from tailforge.gen.jobs.sources import SampleSource, SourceFactory, produce_shard


def _usable_records(storage: Storage, specs: Sequence[ShardSpec]) -> dict[int, ShardRecord]:
    """Records whose shard file is present with the recorded size and sha256 (each recorded shard
    is read whole); anything else is redone."""
    planned = {s.index: s for s in specs}
    usable = {}
    for index, record in load_records(storage.location).items():
        spec = planned.get(index)
        if spec and record.name == spec.name and record.count == spec.count \
                and storage.size(record.name) == record.size_bytes \
                and storage.digest(record.name) == (record.sha256, record.size_bytes):
            usable[index] = record
    return usable


def _remove_stale_temporaries(storage: Storage, planned: Iterable[str]) -> None:
    """Temporaries of writers of the job's own files that died (local folders only; object stores
    never show partial objects). Any other file, a user's ``.x.tmp`` included, is left alone."""
    by_folder = collections.defaultdict(set)
    for name in planned:
        folder, base = posixpath.split(name)
        by_folder[folder].add(base)
    for folder, names in by_folder.items():
        for name in storage.stale_temporaries(folder, of=names):
            storage.remove(name)


def run_job(root: str | os.PathLike, job_config: dict[str, Any], specs: Sequence[ShardSpec],
            make_source: SourceFactory, *, actors: int | None = None, address: str | None = None,
            manifest_extra: dict[str, Any] | None = None, progress: bool = True,
            force: bool = False) -> list[ShardRecord]:
    """Produce every planned shard that has no record yet, then write the manifest.

    ``root`` is a folder path or any fsspec URL: a new or empty folder, or this job's own (the
    same `_job.json`); ``force`` also takes a non-empty folder of other files, none of which is
    touched. ``actors=0`` runs in this process; otherwise a pool of GenerateActors (default: one
    per GPU, or two on a CPU-only machine). Re-running the same job skips recorded shards. The
    manifest also records what was planned (``planned: {shards, samples}``) so `tailforge shards
    verify` can tell a finished set from a partial one.
    """
    planned = job_files(specs)
    check_job_folder(root, job_config, planned, force=force)  # before anything is created there
    storage = Storage(root)
    records: dict[int, ShardRecord] = {}
    try:
        storage.makedirs()
        with storage.lock():
            check_job_folder(root, job_config, planned, force=force)  # again, now that no other driver can write
            root = pin_job(root, job_config)
            return _run_locked(root, storage, job_config, specs, planned, records, make_source, actors=actors,
                               address=address, manifest_extra=manifest_extra, progress=progress)
    except OSError as err:
        kept = (f"{len(records)} of {len(specs)} shards, recorded in {storage.url()}; fix this and re-run the same "
                "command to resume")
        raise StorageError(os_error_message(err, kept)) from None


def _run_locked(root: str | os.PathLike, storage: Storage, job_config: dict[str, Any], specs: Sequence[ShardSpec],
                planned: list[str], records: dict[int, ShardRecord], make_source: SourceFactory, *,
                actors: int | None, address: str | None, manifest_extra: dict[str, Any] | None,
                progress: bool) -> list[ShardRecord]:
    """The body of :func:`run_job` once the folder is checked, locked and pinned; `records` fills
    as shards are recorded (run_job reports them when an OSError ends the job)."""
    root = root if isinstance(root, str) else root.absolute()  # actors may run in another working directory
    _remove_stale_temporaries(storage, planned)
    records.update(_usable_records(storage, specs))
    pending = [s for s in specs if s.index not in records]
    bar = tqdm(total=sum(s.count for s in specs), initial=sum(r.count for r in records.values()),
               unit="img", desc=f"gen {specs[0].job}" if specs else "gen", disable=not progress)

    def finish(record: ShardRecord) -> None:
        save_record(root, record)
        records[record.index] = record
        bar.update(record.count)

    if pending and actors == 0:
        source = make_source()
        for spec in pending:
            finish(produce_shard(source, str(root), spec, worker=f"{socket.gethostname()}:{os.getpid()}"))
    elif pending:
        from tailforge.gen.jobs.ray import run_pool  # Ray is imported only when actors are asked for

        run_pool(make_source, str(root), pending, finish, actors=actors, address=address)
    bar.close()
    _remove_stale_temporaries(storage, planned)  # left by actors killed mid-shard during this run
    totals = {"shards": len(specs), "samples": sum(s.count for s in specs)}
    write_manifest(root, records.values(), extra={**(manifest_extra or {}), "job": job_config, "planned": totals,
                                                  **_gate_counts(records)})
    return [records[i] for i in sorted(records)]


def _gate_counts(records: dict[int, ShardRecord]) -> dict[str, Any]:
    """The manifest's count of what the memorization gate dropped (gen/jobs/gate.py), in all and
    per recorded shard in shard order, like the manifest's file list; nothing for an ungated job."""
    dropped = [records[i].replicas_dropped for i in sorted(records)]
    if all(count is None for count in dropped):
        return {}
    return {"memorization_gate": {"replicas_dropped": sum(count or 0 for count in dropped),
                                  "replicas_dropped_per_shard": dropped}}


def model_manifest(model_path: str) -> dict[str, Any]:
    """What a shard set's manifest records about the model that generated it."""
    from tailforge.gen.models.diffusion import load_diffusion_model

    meta = load_diffusion_model(model_path).meta
    return {"num_classes": meta.num_classes, "class_names": list(meta.class_names), "image_size": meta.image_size,
            "channels": meta.channels}


def run_generation(out: str | os.PathLike, config: ShardJobConfig, *, actors: int | None = None,
                   address: str | None = None, progress: bool = True, force: bool = False) -> list[ShardRecord]:
    """The generation job `config` describes (a Baseline, LowDensity or ReconstructConfig): its kind's
    source, its sample count (``config.num``, or the whole split a reconstruction reads) and the
    manifest fields every shard set of that kind records (the model's, and a reconstruction's t_re
    and source), run by :func:`run_config_job`."""
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.jobs.sources import SOURCES

    if getattr(config, "kind", None) not in SOURCES:
        raise ConfigError(f"a generation job takes a BaselineConfig, LowDensityConfig or ReconstructConfig, got "
                          f"{type(config).__name__}")
    extra = model_manifest(config.model)
    if config.kind == "reconstruct":
        num = len(load_dataset(config.dataset, config.split))
        extra = {**extra, "t_re": config.t_re, "source_dataset": config.dataset, "source_split": config.split}
    else:
        num = config.num
    return run_config_job(out, config, SOURCES[config.kind], num, actors=actors, address=address,
                          manifest_extra=extra, progress=progress, force=force)


def run_config_job(out: str | os.PathLike, config: ShardJobConfig, source: Callable[[Any], SampleSource], num: int, *,
                   actors: int | None = None, address: str | None = None,
                   manifest_extra: dict[str, Any] | None = None, progress: bool = True,
                   force: bool = False) -> list[ShardRecord]:
    """:func:`run_job` for a baseline, low-density or reconstruction config: plans `num` samples,
    pins the content hashes of the folders it reads (``config.pins()``) in the job config and
    builds ``source(config)`` once per actor."""
    from tailforge.gen.core.files import config_dict
    from tailforge.gen.data.shards.format import plan_shards

    specs = plan_shards(config.job, num, config.shard_size, config.seed)
    return run_job(out, {**config_dict(config), "pins": config.pins()}, specs, functools.partial(source, config),
                   actors=actors, address=address, manifest_extra=manifest_extra, progress=progress, force=force)
