"""Generation jobs on a pool of Ray actors.

A job is a list of ShardSpecs planned up front and a *source*: an object, built once per actor
by a picklable factory, whose ``samples(spec)`` yields the encoded samples of one shard and whose
``model_evals`` counts denoiser evaluations. Actors are thin (DESIGN.md): ``__init__`` builds the
source (loads the model once), ``write_shard`` calls the pure shard writer. The driver is the only
writer of records and of the manifest, so there is never a race on them.

The same job runs in-process with ``actors=0`` (no Ray), which is also the baseline the `ray`
benchmark compares the pool against.

Exactly once, whatever dies (tests/test_faults.py kills actors and drivers at random points):

* a killed actor: Ray restarts it (``max_restarts``) and re-runs its in-flight shards on the new
  process (``max_task_retries``); an actor Ray gives up on is replaced by the driver and its shards
  are queued again. A shard is redone from its spec, and its bytes depend only on the spec, so a
  retry racing a late original publishes the same file;
* a killed driver: re-running the same command keeps every recorded shard whose file is present
  with the recorded size and redoes the rest; temporaries of crashed writers are removed;
* a shard is published atomically (gen/storage.py) before its record, and only the driver writes
  records and the manifest, so no shard is half-written, duplicated or lost.

The output folder may be any fsspec URL (``s3://bucket/prefix``) that every node can reach.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import ray
from tqdm import tqdm

from .errors import NonFiniteError, TailforgeError
from .shards import (RECORDS_DIR, ShardError, ShardRecord, ShardSpec, load_records, prepare_job_folder, save_record,
                     write_manifest, write_shard)
from .storage import Storage


class SampleSource(Protocol):
    model_evals: int

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]: ...


SourceFactory = Callable[[], SampleSource]


def produce_shard(source: SampleSource, root: str, spec: ShardSpec, worker: str) -> ShardRecord:
    """Write one shard from `source` and describe it (sha256, size, time, model evaluations)."""
    start_time, start_evals = time.perf_counter(), source.model_evals
    try:
        sha256, size = write_shard(root, spec, source.samples(spec))
    except NonFiniteError as err:  # name the shard; nothing of it was published
        raise NonFiniteError(f"shard {spec.name} (samples {spec.start}..{spec.start + spec.count - 1}): {err}") from None
    return ShardRecord(name=spec.name, index=spec.index, start=spec.start, count=spec.count, sha256=sha256,
                       size_bytes=size, seconds=round(time.perf_counter() - start_time, 4),
                       model_evals=source.model_evals - start_evals, worker=worker)


@ray.remote
class GenerateActor:
    """Holds one source (one model) and writes the shards it is given."""

    def __init__(self, make_source: SourceFactory):
        self.source = make_source()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def write_shard(self, root: str, spec: ShardSpec) -> ShardRecord:
        return produce_shard(self.source, root, spec, self.worker)


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS); without one, start a local instance.

    A local instance is started explicitly (``address="local"``) rather than attaching to whatever
    `ray start` cluster happens to run on this machine.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ray.exceptions.AuthenticationError as err:
            raise TailforgeError(f"Ray cluster at {address} refused the connection: {str(err).splitlines()[0]} "
                                 "(a cluster with token authentication needs RAY_AUTH_MODE=token and its token in "
                                 "~/.ray/auth_token or $RAY_AUTH_TOKEN)") from None
        except ConnectionError as err:
            hint = "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else (
                " (if the cluster uses token authentication, Ray's default, set RAY_AUTH_MODE=token here)")
            raise TailforgeError(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]}{hint}") from None
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 object_store_memory=1 << 30)


def actor_options(num_actors: int) -> dict[str, Any]:
    """One GPU per actor when the cluster has GPUs; otherwise the CPUs split evenly (Ray then sets
    OMP_NUM_THREADS to each actor's share). Actors restart after a crash and their in-flight shard
    is retried: a shard write is idempotent (temp file + rename), so a retry cannot duplicate."""
    resources = ray.cluster_resources()
    options: dict[str, Any] = {"max_restarts": 3, "max_task_retries": 3}
    if resources.get("GPU", 0) >= 1:
        options.update(num_gpus=1, num_cpus=1)
    else:
        options.update(num_cpus=max(1, int(resources.get("CPU", 1)) // num_actors))
    return options


def default_num_actors() -> int:
    """One actor per GPU; two CPU actors on a machine without GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus if gpus else 2


def _usable_records(storage: Storage, specs: Sequence[ShardSpec]) -> dict[int, ShardRecord]:
    """Records whose shard file is present with the recorded size; anything else is redone."""
    planned = {s.index: s for s in specs}
    usable = {}
    for index, record in load_records(storage.location).items():
        spec = planned.get(index)
        if spec and record.name == spec.name and record.count == spec.count \
                and storage.size(record.name) == record.size_bytes:
            usable[index] = record
    return usable


def _remove_stale_temporaries(storage: Storage) -> None:
    """Temporaries of writers that died (local folders only; object stores never show partial objects)."""
    for name in storage.stale_temporaries() + storage.stale_temporaries(RECORDS_DIR):
        storage.remove(name)


def run_job(root: str | os.PathLike, job_config: dict[str, Any], specs: Sequence[ShardSpec],
            make_source: SourceFactory, *, actors: int | None = None, address: str | None = None,
            manifest_extra: dict[str, Any] | None = None, progress: bool = True) -> list[ShardRecord]:
    """Produce every planned shard that has no record yet, then write the manifest.

    ``root`` is a folder path or any fsspec URL. ``actors=0`` runs in this process; otherwise a
    pool of GenerateActors (default: one per GPU, or two on a CPU-only machine). Re-running the
    same job skips recorded shards. The manifest also records what was planned
    (``planned: {shards, samples}``) so `tailforge shards verify` can tell a finished set from a
    partial one.
    """
    root = prepare_job_folder(root, job_config)
    root = root if isinstance(root, str) else root.absolute()  # actors may run in another working directory
    storage = Storage(root)
    _remove_stale_temporaries(storage)
    records = _usable_records(storage, specs)
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
        connect(address)
        count = min(actors or default_num_actors(), len(pending))
        options = actor_options(count)
        _drain(lambda: GenerateActor.options(**options).remote(make_source), count, str(root), pending, finish)
    bar.close()
    _remove_stale_temporaries(storage)  # left by actors killed mid-shard during this run
    planned = {"shards": len(specs), "samples": sum(s.count for s in specs)}
    write_manifest(root, records.values(), extra={**(manifest_extra or {}), "job": job_config, "planned": planned})
    return [records[i] for i in sorted(records)]


def model_manifest(model_path: str) -> dict[str, Any]:
    """What a shard set's manifest records about the model that generated it."""
    from .checkpoint import load_diffusion_model

    meta = load_diffusion_model(model_path).meta
    return {"num_classes": meta.num_classes, "class_names": list(meta.class_names), "image_size": meta.image_size,
            "channels": meta.channels}


def run_config_job(out: str | os.PathLike, config: Any, source: Callable[[Any], SampleSource], num: int, *,
                   actors: int | None = None, address: str | None = None,
                   manifest_extra: dict[str, Any] | None = None, progress: bool = True) -> list[ShardRecord]:
    """:func:`run_job` for a job config with ``job``, ``shard_size`` and ``seed`` fields (the
    baseline, low-density and reconstruction configs): plans `num` samples and builds ``source(config)``
    once per actor."""
    from .checkpoint import config_dict
    from .shards import plan_shards

    specs = plan_shards(config.job, num, config.shard_size, config.seed)
    return run_job(out, config_dict(config), specs, functools.partial(source, config), actors=actors, address=address,
                   manifest_extra=manifest_extra, progress=progress)


def _drain(new_actor: Callable[[], Any], count: int, root: str, pending: Sequence[ShardSpec],
           finish: Callable[[ShardRecord], None]) -> None:
    """Keep two shards in flight per actor (one running, one queued, so an actor never idles
    between shards) and record each as it completes, in completion order.

    A task that fails because its actor died for good (Ray's restarts or retries used up) puts
    its shard back in the queue and the actor is replaced, at most ``2 * count + 2`` times per job.
    An error raised by the source itself (a TailforgeError such as NonFiniteError) stops the job
    with that error."""
    queue = list(reversed(pending))
    pool = [new_actor() for _ in range(count)]
    in_flight: dict[Any, tuple[Any, ShardSpec]] = {}
    replacements = 0

    def top_up() -> None:
        for actor in pool:
            while queue and sum(1 for a, _ in in_flight.values() if a is actor) < 2:
                spec = queue.pop()
                in_flight[actor.write_shard.remote(root, spec)] = (actor, spec)

    top_up()
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        actor, spec = in_flight.pop(done[0])
        try:
            record = ray.get(done[0])
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, TailforgeError):
                raise err.cause from None
            raise
        except ray.exceptions.RayActorError as err:
            queue.append(spec)
            if actor in pool:
                replacements += 1
                if replacements > 2 * count + 2:
                    raise ShardError(f"generation actors died {replacements} times; giving up "
                                     f"(last: {str(err).splitlines()[0]}). Re-run the command to resume.") from None
                ray.kill(actor, no_restart=True)
                pool[pool.index(actor)] = new_actor()
            top_up()
            continue
        finish(record)
        top_up()
