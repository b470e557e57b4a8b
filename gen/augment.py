"""DiffAug served on the fly by a pool of Ray actors (seed 003; DESIGN.md, "diffaug").

Trainers call :class:`ServedDiffAugStage` as a pipeline stage (the contract is in
:mod:`tailforge.gen.diffaug`): it sends each batch to an :class:`AugmentActor` (one diffusion model
each), keeps at most ``max_in_flight`` batches in flight (backpressure: the trainer's batch
iterator is only advanced when a slot frees up) and yields the batches in their input order.

No batch is lost or duplicated when an actor dies: actors restart and Ray retries their tasks
(``max_restarts`` / ``max_task_retries``), and when a task still fails with an actor error (the
actor was killed for good, or ran out of restarts) the stage starts a replacement actor and
resubmits that batch. Each batch is yielded exactly once, at its position, and a resubmitted
batch gives the same augmentation because every row's randomness is seeded by
(seed, batch index, row), never by which actor ran it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from .diffaug import Batch, DiffAugConfig, augment_batch, load_denoiser
from .errors import ConfigError, TailforgeError
from .jobs import actor_options, connect


@ray.remote
class AugmentActor:
    """Holds one diffusion model and returns the DiffAug batch of each batch it is sent."""

    def __init__(self, config: DiffAugConfig):
        self.config = config
        self.denoiser, self.model = load_denoiser(config, "cuda" if torch.cuda.is_available() else "cpu")
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
