"""Everything that runs on Ray actors: the generation pool and the DiffAug service.

Actors are thin (DESIGN.md): ``__init__`` builds the source or loads the model once, methods call
pure functions. This is the only module of ``gen`` that imports Ray.

Generation (:func:`run_pool`, called by gen/jobs/runner.py for ``actors != 0``): a killed actor is
restarted by Ray (``max_restarts``) and its in-flight shards re-run on the new process
(``max_task_retries``); an actor Ray gives up on is replaced by the driver and its shards are
queued again. A shard is redone from its spec, and its bytes depend only on the spec.

DiffAug served on the fly (Sastry et al. 2023; :class:`ServedDiffAugStage`): trainers call it as a pipeline
stage (the contract is in gen/methods/diffaug.py). It sends each batch to an
:class:`AugmentActor` (one diffusion model each), keeps at most ``max_in_flight`` batches in
flight (backpressure: the trainer's batch iterator is only advanced when a slot frees up) and
yields the batches in their input order. No batch is lost or duplicated when an actor dies:
actors restart and Ray retries their tasks, and when a task still fails with an actor error the
stage starts a replacement actor and resubmits that batch. A resubmitted batch gives the same
augmentation because every row's randomness is seeded by (seed, batch index, row), never by
which actor ran it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError, ShardError, TailforgeError
from tailforge.gen.core.stage import Batch
from tailforge.gen.data.shards.format import ShardRecord, ShardSpec
from tailforge.gen.jobs.sources import SourceFactory, produce_shard
from tailforge.gen.methods.diffaug import DiffAugConfig, augment_batch, load_denoiser


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


def run_pool(make_source: SourceFactory, root: str, pending: Sequence[ShardSpec],
             finish: Callable[[ShardRecord], None], *, actors: int | None = None, address: str | None = None) -> None:
    """Produce `pending` shards on a pool of GenerateActors (default one per GPU, or two on a CPU-only
    cluster), calling ``finish(record)`` in the driver as each completes."""
    connect(address)
    count = min(actors or default_num_actors(), len(pending))
    options = actor_options(count)
    _drain(lambda: GenerateActor.options(**options).remote(make_source), count, root, pending, finish)


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], *, address: str | None = None) -> Iterator[Any]:
    """``fn(*args)`` for every args tuple of `calls` as Ray tasks (one CPU each, a GPU each when the
    cluster has one, retried twice if a worker dies); yields the results in completion order."""
    connect(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(fn).options(num_cpus=1, num_gpus=1 if gpus >= 1 else 0, max_retries=2)
    pending = [task.remote(*args) for args in calls]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


#: seconds without a finished shard after which an idle actor takes a backup copy of another's
BACKUP_AFTER_S = 10.0


def _drain(new_actor: Callable[[], Any], count: int, root: str, pending: Sequence[ShardSpec],
           finish: Callable[[ShardRecord], None], *, backup_after: float = BACKUP_AFTER_S) -> None:
    """Keep two shards in flight per actor (one running, one queued, so an actor never idles
    between shards) and record each as it completes, in completion order.

    A task that fails because its actor died for good (Ray's restarts or retries used up) puts
    its shard back in the queue and the actor is replaced, at most ``2 * count + 2`` times per job.
    An error raised by the source itself (a TailforgeError such as NonFiniteError) or by its
    writes (an OSError such as a full disk) stops the job with that error.

    Stragglers get backup tasks (as MapReduce does, Dean & Ghemawat 2004): when no shard has
    finished for `backup_after` seconds and the queue is empty, every idle actor is given a copy
    of a shard another actor still holds. That is what lets a job finish when a restarted actor
    cannot be placed (its node is gone and no other node has a free CPU): the survivors redo its
    shards. A shard's bytes depend only on its spec and publishing is atomic, so a copy that also
    finishes writes the same file; only the first record counts."""
    queue = list(reversed(pending))
    pool = [new_actor() for _ in range(count)]
    in_flight: dict[Any, tuple[Any, ShardSpec]] = {}
    done_indices: set[int] = set()
    backed_up: set[int] = set()
    replacements = 0

    def load(actor: Any) -> int:
        return sum(1 for a, _ in in_flight.values() if a is actor)

    def top_up() -> None:
        for actor in pool:
            while queue and load(actor) < 2:
                spec = queue.pop()
                if spec.index not in done_indices:
                    in_flight[actor.write_shard.remote(root, spec)] = (actor, spec)

    def back_up_stragglers() -> None:
        for actor in pool:
            if load(actor):
                continue
            straggler = next((spec for a, spec in in_flight.values() if a is not actor
                              and spec.index not in backed_up and spec.index not in done_indices), None)
            if straggler is not None:
                backed_up.add(straggler.index)
                in_flight[actor.write_shard.remote(root, straggler)] = (actor, straggler)

    top_up()
    while len(done_indices) < len(pending):
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=backup_after)
        if not done:
            if not queue:
                back_up_stragglers()
            continue
        actor, spec = in_flight.pop(done[0])
        try:
            record = ray.get(done[0])
        except ray.exceptions.RayTaskError as err:
            if spec.index in done_indices:  # a copy of a finished shard: its first record stands
                continue
            if isinstance(err.cause, (TailforgeError, OSError)):
                raise err.cause from None
            raise
        except ray.exceptions.RayActorError as err:
            if spec.index not in done_indices:
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
        if spec.index not in done_indices:
            done_indices.add(spec.index)
            finish(record)
        top_up()
    # actors still holding copies of finished shards end with the pool's handles


@ray.remote
class AugmentActor:
    """Holds one diffusion model and returns the DiffAug batch of each batch it is sent."""

    def __init__(self, config: DiffAugConfig):
        self.config = config
        self.denoiser, self.model = load_denoiser(config, default_device())
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def augment(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        # arrays from the object store are read-only views: torch.tensor copies them
        return augment_batch(self.denoiser, self.model, self.config, torch.tensor(batch["images"]),
                             torch.tensor(batch["labels"]), int(batch["index"]), int(batch["seed"])).numpy()

    def worker_name(self) -> str:
        return self.worker


@dataclasses.dataclass
class _InFlight:
    batch: Batch  # the trainer's batch, yielded back with "augmented"
    payload: Any  # ObjectRef of the numpy payload (put once, reused by a resubmission)
    slot: int  # pool position the batch was sent to
    actor: Any  # the actor handle it was sent to
    ref: Any  # ObjectRef of the result
    attempts: int = 1


_END = object()


class ServedDiffAugStage:
    """The DiffAug stage on a pool of AugmentActors: order-preserving, bounded, restart-safe.

    The pool starts on first use (joining ``address`` / $RAY_ADDRESS, or a local Ray instance) and
    lives until :meth:`close` (or the end of a ``with`` block), so the stage serves every epoch of a
    run from the same actors.
    """

    def __init__(self, config: DiffAugConfig, *, actors: int, max_in_flight: int | None = None,
                 address: str | None = None, actor_cpus: float | None = None, max_attempts: int = 4):
        if actors < 1:
            raise ConfigError(f"a served DiffAug stage needs actors >= 1, got {actors}")
        max_in_flight = 2 * actors if max_in_flight is None else max_in_flight
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if actor_cpus is not None and not actor_cpus > 0:
            raise ConfigError(f"actor_cpus must be > 0, got {actor_cpus}")
        self.config, self.num_actors, self.max_in_flight = config, actors, max_in_flight
        self.address, self.actor_cpus, self.max_attempts = address, actor_cpus, max_attempts
        self.pool: list[Any] = []
        self.replaced = 0  # actors started to replace dead ones
        self._options: dict[str, Any] = {}

    def _start(self) -> None:
        if self.pool:
            return
        connect(self.address)
        # one GPU per actor on a GPU cluster, else the CPUs split between actors; Ray restarts a
        # crashed actor and retries its tasks before the stage has to replace it
        self._options = actor_options(self.num_actors)
        if self.actor_cpus is not None:
            self._options["num_cpus"] = self.actor_cpus
        self.pool = [AugmentActor.options(**self._options).remote(self.config) for _ in range(self.num_actors)]

    def close(self) -> None:
        """Stop the actors (a later call starts a new pool)."""
        for actor in self.pool:
            ray.kill(actor)
        self.pool = []

    def __enter__(self) -> "ServedDiffAugStage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _submit(self, item: _InFlight) -> None:
        item.actor = self.pool[item.slot]
        item.ref = item.actor.augment.remote(item.payload)

    def _result(self, item: _InFlight) -> np.ndarray:
        while True:
            try:
                return ray.get(item.ref)
            except RayActorError as err:
                if item.attempts >= self.max_attempts:
                    raise TailforgeError(f"DiffAug batch {item.batch['index']} failed on {item.attempts} actors; "
                                         f"last error: {err}") from err
                if self.pool[item.slot] is item.actor:  # not yet replaced by an earlier failure
                    ray.kill(item.actor, no_restart=True)
                    self.pool[item.slot] = AugmentActor.options(**self._options).remote(self.config)
                    self.replaced += 1
                item.attempts += 1
                self._submit(item)

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        self._start()
        source = iter(batches)
        in_flight: collections.deque[_InFlight] = collections.deque()
        sent = 0
        while True:
            while len(in_flight) < self.max_in_flight:
                batch = next(source, _END)
                if batch is _END:
                    break
                payload = ray.put({"images": batch["images"].float().contiguous().numpy(),
                                   "labels": batch["labels"].long().numpy(),
                                   "index": np.int64(batch["index"]), "seed": np.int64(batch["seed"])})
                item = _InFlight(batch=batch, payload=payload, slot=sent % self.num_actors, actor=None, ref=None)
                self._submit(item)
                in_flight.append(item)
                sent += 1
            if not in_flight:
                return
            item = in_flight.popleft()
            yield {**item.batch, "augmented": torch.tensor(self._result(item))}
