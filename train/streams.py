"""WebDataset input pipelines for classifier training: real data and any number of synthetic shard
sets, mixed by ratio, shuffled, and split by Ray Train rank and by DataLoader worker.

Every source is a shard set on disk (gen/data/shards/ layout). The real dataset is written once to
shards under the run folder (``write_real_shards``) unless it already is one (``shards:PATH``):
one reader for every source means mixing, rank/worker splitting, resampling and follow mode are
the same code for real and synthetic data, the loader's cost is the same as in production (tar
reading + PNG decoding, which ``tailforge bench stream`` measures), and Ray Train workers on other
nodes read the files instead of each loading the dataset.

A *reader* is one (rank, loader worker) pair. One :class:`MixedStream` covers a whole run (all its
epochs) for one rank, so DataLoader workers start once per run. The rank's batches are numbered by
global step ``g = epoch * steps_per_epoch + step``; loader worker ``g % W`` makes batch ``g``, which
is the order in which a DataLoader visits its workers, so batches arrive in global-step order.

Epoch modes:

* resampled (default): each reader draws shards with replacement, with probability proportional to
  their sample counts (so every sample is equally likely), independently per source, and takes the
  source of each sample with probability ``weight / sum(weights)``. An epoch is a number of samples
  (``epoch_samples`` over all ranks); every rank takes ``ceil(epoch_samples / (batch * ranks))``
  full batches whatever the number of shards, so no rank starves when shards are fewer than
  readers. Streams are seeded by (seed, epoch, rank, worker).
* exact (``resample=False``): every sample of every source once per epoch (the weights must be 1:
  the mix ratio is then the sources' size ratio). All readers read the epoch's shards in the same
  seeded order; stream position ``p`` belongs to rank ``p % R`` and, within the rank, position
  ``q = p // R`` to batch ``q // b`` and so to the worker that makes that batch. Ranks whose share
  is one sample short repeat one sample so that every rank takes the same number of steps (as
  torch's DistributedSampler pads), i.e. at most R - 1 repeats per epoch and none with one rank.
  Each reader reads every tar but decodes only its own samples.

Follow mode (resampled only): a synthetic set is read while its generation job is still writing
it. Readers draw from the shards whose record is in ``OUT/_records/`` (gen/data/shards/: a record
exists only once its shard is complete) and re-list the records every ``follow_poll`` seconds, so
each shard joins the pool as soon as it is recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from tailforge.gen.core.errors import ConfigError, ShardError, TailforgeError
from tailforge.gen.core.noise import derive_seed
from tailforge.gen.data.datasets import LabeledImages, load_dataset, parse_spec
from tailforge.gen.data.shards.format import (
    RECORDS_DIR,
    ShardSpec,
    encode_sample,
    plan_shards,
    sample_key,
)
from tailforge.gen.data.shards.read import (
    decode_sample_image,
    is_count,
    is_safe_shard_name,
    parse_label,
    read_shard_bytes,
    sample_location,
    shard_entries,
)
from tailforge.gen.data.shards.tar import tar_samples
from tailforge.gen.data.storage import Storage
from tailforge.train.config import REAL, MixSource


def parse_mix(text: str, shards: dict[str, str] | None = None) -> tuple[MixSource, ...]:
    """``real=1.0,lowdensity=0.3`` -> MixSources. A name other than ``real`` is looked up in
    ``shards`` (name -> shard-set folder, from ``--shards NAME=PATH``); a name not found there is
    taken as the folder itself (``--mix real=1,runs/baseline=0.5``)."""
    shards = dict(shards or {})
    sources: list[MixSource] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, weight_text = item.rpartition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--mix entry {item!r} is not NAME=WEIGHT (e.g. real=1.0,lowdensity=0.3)")
        name = name.strip()
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"--mix entry {item!r}: weight {weight_text!r} is not a number") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise ConfigError(f"--mix entry {item!r}: weight must be a finite number > 0")
        if name == REAL:
            sources.append(MixSource(REAL, weight))
        else:
            path = shards.pop(name, name)
            sources.append(MixSource(Path(path).name if name == path else name, weight, str(path)))
    if not sources:
        raise ConfigError(f"--mix {text!r} names no source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"--mix {text!r} names a source twice")
    if shards:
        raise ConfigError(f"--shards names {sorted(shards)} that --mix does not use")
    return tuple(sources)


# ------------------------------------------------------------------------------------------------
# Shard sets


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """A resolved source: a shard-set folder (a path or any fsspec URL) with its weight."""

    name: str  # source name (as in the mix)
    root: str  # shard-set folder or URL
    weight: float  # relative sampling weight
    follow: bool = False  # read the records (growing while a job writes) instead of the manifest

    def shards(self) -> list[tuple[str, int]]:
        """(path or URL, number of samples) of every shard readable now, in shard order."""
        if self.follow:
            storage = Storage(self.root)
            records = [_record(self.root, name) for name in storage.list(RECORDS_DIR, suffix=".json")]
            return [(storage.url(r["name"]), r["count"]) for r in sorted(records, key=lambda r: r["index"])]
        return [(e.url, e.count if e.count is not None else count_tar_samples(e.url))
                for e in shard_entries(self.root, "train")]


@functools.lru_cache(maxsize=65536)
def _record(root: str, name: str) -> dict[str, Any]:
    """A shard record, parsed once per process: records are immutable once written, and a record
    exists only after its shard is complete (gen/data/shards/). Its name must stay inside the set
    and its index and count be integers >= 0, as the manifest reader requires of a manifest."""
    storage = Storage(root)
    record = storage.read_json(f"{RECORDS_DIR}/{name}", "shard record")
    fields = record if isinstance(record, dict) else {}
    if not (is_safe_shard_name(fields.get("name")) and is_count(fields.get("index")) and is_count(fields.get("count"))):
        raise ShardError(f"{storage.url(f'{RECORDS_DIR}/{name}')}: not a shard record (needs a file name inside "
                         f"the set and integer index and count >= 0): {str(record)[:120]}")
    return record


def count_tar_samples(url: str) -> int:
    """Number of samples in a tar shard: for manifests without shard_lengths."""
    return len(tar_samples(url, read_shard_bytes(url)))


class _ShardPool:
    """The shards one reader of one set draws from, weighted by their sample counts; in follow mode
    it re-lists the records at most every ``poll`` seconds and waits up to ``timeout`` seconds for
    the first one."""

    def __init__(self, shard_set: ShardSet, rng: np.random.Generator, poll: float, timeout: float):
        self.set, self.rng, self.poll, self.timeout = shard_set, rng, poll, timeout
        self.urls: list[str] = []
        self.probs = np.empty(0)
        self.listed_at = -math.inf

    def _refresh(self) -> None:
        shards = [(url, n) for url, n in self.set.shards() if n > 0]
        self.listed_at = time.monotonic()
        if shards:
            counts = np.array([n for _, n in shards], dtype=np.float64)
            self.urls, self.probs = [url for url, _ in shards], counts / counts.sum()

    def draw(self) -> str:
        if self.set.follow and time.monotonic() - self.listed_at >= self.poll:
            self._refresh()
        elif not self.urls and not self.set.follow:
            self._refresh()
            if not self.urls:
                raise ShardError(f"shard set {self.set.root} ({self.set.name}) holds no samples")
        waited = time.monotonic()
        while not self.urls:
            if time.monotonic() - waited > self.timeout:
                raise ShardError(f"follow: no shard recorded under {Storage(self.set.root).url(RECORDS_DIR)} after "
                                 f"{self.timeout:.0f} s; is its generation job running?")
            time.sleep(self.poll)
            self._refresh()
        return self.urls[self.rng.choice(len(self.urls), p=self.probs)]

    def urls_forever(self) -> Iterator[dict[str, str]]:
        while True:
            yield {"url": self.draw()}


# ------------------------------------------------------------------------------------------------
# Reading tar shards


def stream_samples(urls: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """webdataset-style raw samples (``__key__``, ``__url__``, one entry per extension) of the shards
    named by a stream of ``{"url": ...}`` dicts (paths or fsspec URLs). Each shard is read whole and
    checked by gen.data.shards.tar.tar_samples (the same reader as every other, so damaged shards and unsafe
    members stop training with the shard and byte offset) before any of its samples is yielded."""
    for item in urls:
        url = item["url"]
        for raw in tar_samples(url, read_shard_bytes(url)):
            raw["__url__"] = url
            yield raw


# ------------------------------------------------------------------------------------------------
# The real dataset as shards


class _RealSource:
    """Encoded samples of an in-memory split, shaped like a generation job's source (gen/jobs/runner.py)."""

    model_evals = 0

    def __init__(self, data: LabeledImages):
        self.data = data

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]:
        for i in spec.indices:
            image = self.data.images[i].permute(1, 2, 0).contiguous().numpy()
            yield encode_sample(sample_key(spec.job, i), image, int(self.data.labels[i]),
                                {"source_key": self.data.keys[i], "dataset": self.data.info.spec})


def real_shard_root(spec: str, out: str | Path) -> Path:
    """Where a run in ``out`` reads the real training split from: a ``shards:PATH`` spec without
    options is a shard set already and is read in place; anything else is written once to
    ``OUT/data/real`` by :func:`write_real_shards`."""
    parsed = parse_spec(spec)
    if parsed.name == "shards" and not parsed.options:
        return Path(parsed.path).expanduser()
    return Path(out) / "data" / REAL


def write_real_shards(spec: str, root: str | Path, *, shard_size: int = 256, progress: bool = False) -> Path:
    """The dataset's training split as a shard set under ``root``, through the generation-job
    machinery (atomic shards, records, timm manifest), so a re-run reuses the recorded shards."""
    from tailforge.gen.jobs.runner import run_job

    data = load_dataset(spec, "train")
    info = data.info
    job = {"kind": "real", "dataset": spec, "num": len(data), "shard_size": shard_size}
    run_job(root, job, plan_shards(REAL, len(data), shard_size, seed=0), functools.partial(_RealSource, data),
            actors=0, progress=progress,
            manifest_extra={"num_classes": info.num_classes, "class_names": list(info.class_names),
                            "flip_augment": info.flip_augment})
    return Path(root)


# ------------------------------------------------------------------------------------------------
# The stream


@dataclasses.dataclass(frozen=True)
class MixedStream(IterableDataset):
    """One rank's batches for epochs ``[start_epoch, end_epoch)``: dicts with "images" (uint8 NCHW),
    "labels" (int64), "source" (int64 index into ``sets``), "keys" (list of sample keys) and "step"
    (the global step: epoch * steps_per_epoch + step). See the module docstring for the modes."""

    sets: tuple[ShardSet, ...]  # the sources
    batch_size: int  # samples per batch on this rank
    image_shape: tuple[int, int, int]  # C, H, W every sample must have
    num_classes: int  # labels must lie in [0, num_classes)
    epoch_samples: int = 0  # resampled mode: samples per epoch over all ranks
    resample: bool = True  # False: exact epochs (every sample once)
    start_epoch: int = 0  # first epoch to yield
    end_epoch: int = 1  # one past the last epoch
    rank: int = 0  # Ray Train world rank
    world_size: int = 1  # number of ranks
    loader_workers: int = 0  # DataLoader workers per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # samples in each reader's shuffle buffer
    seed: int = 0  # run seed
    follow_poll: float = 0.5  # follow mode: seconds between listings of the records
    follow_timeout: float = 600.0  # follow mode: seconds to wait for a set's first record

    def __post_init__(self) -> None:
        if not self.sets:
            raise ConfigError("a stream needs at least one source")
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"bad stream layout: batch {self.batch_size}, rank {self.rank} of {self.world_size}")
        if self.resample and self.epoch_samples < 1:
            raise ConfigError(f"resampled epochs need epoch_samples >= 1, got {self.epoch_samples}")
        if not self.resample:
            if any(s.follow for s in self.sets):
                raise ConfigError("follow mode reads a growing shard set, so it needs resampled epochs")
            if any(s.weight != 1 for s in self.sets):
                raise ConfigError("exact epochs take every sample of every source once, so mix weights must be 1 "
                                  f"(got {', '.join(f'{s.name}={s.weight:g}' for s in self.sets)}); "
                                  "weighted mixing needs resampled epochs")

    # -- sizes ----------------------------------------------------------------------------------

    @functools.cached_property
    def _exact_shards(self) -> list[tuple[str, int, int]]:
        """(path, samples, source index) of every shard, listed once (before loader workers fork,
        so that all readers of a rank agree on it)."""
        return [(url, n, i) for i, s in enumerate(self.sets) for url, n in s.shards()]

    @property
    def num_samples(self) -> int:
        """Exact mode: samples per epoch over all ranks (before padding)."""
        return sum(n for _, n, _ in self._exact_shards)

    @property
    def steps_per_epoch(self) -> int:
        if self.resample:
            return -(-self.epoch_samples // (self.batch_size * self.world_size))
        rank_samples = -(-self.num_samples // self.world_size)  # padded: every rank the same
        if rank_samples == 0:
            raise ShardError(f"the sources {[s.root for s in self.sets]} hold no samples")
        return -(-rank_samples // self.batch_size)

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.steps_per_epoch

    def at(self, start_epoch: int, end_epoch: int) -> "MixedStream":
        return dataclasses.replace(self, start_epoch=start_epoch, end_epoch=end_epoch)

    def batches(self) -> Iterator[dict[str, Any]]:
        """Every batch of this rank, in global-step order, through a DataLoader (batches are made
        in the readers). A reader's error keeps its own one-line message: a DataLoader re-raises a
        worker's exception with the worker's traceback folded into the message."""
        loader = DataLoader(self, batch_size=None, num_workers=self.loader_workers, persistent_workers=False,
                            prefetch_factor=4 if self.loader_workers else None, collate_fn=_unchanged)
        try:
            for batch in loader:
                yield _from_pipe(batch)
        except TailforgeError as err:
            text = str(err).strip()
            if not text.startswith("Caught "):
                raise
            raise type(err)(text.splitlines()[-1].split(": ", 1)[-1]) from None

    # -- reading --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != max(1, self.loader_workers):
            raise ConfigError(f"stream built for {self.loader_workers} loader workers runs under {workers}")
        steps = self.steps_per_epoch
        for epoch in range(self.start_epoch, self.end_epoch):
            mine = [s for s in range(steps) if (epoch * steps + s) % workers == worker]
            if not mine:
                continue
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, 1))
            if self.resample:
                raw = self._resampled(epoch, worker, len(mine) * self.batch_size)
            else:
                raw = self._exact(epoch, set(mine))
            samples = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw)
            for step, batch in zip(mine, self._batches(samples)):
                batch["step"] = epoch * steps + step
                yield _for_pipe(batch) if info else batch

    def _resampled(self, epoch: int, worker: int, count: int) -> Iterator[dict[str, Any]]:
        """``count`` raw samples: per sample a source drawn by weight, from that source's own
        endless stream of resampled shards. (webdataset's RandomMix draws from the global `random`
        module, so it cannot be seeded per reader and epoch; this is its seeded equivalent.)"""
        base = (self.seed, epoch, self.rank, worker)
        weights = np.array([s.weight for s in self.sets], dtype=np.float64)
        choose = np.random.default_rng(derive_seed(*base, 2))
        streams = []
        for i, shard_set in enumerate(self.sets):
            pool = _ShardPool(shard_set, np.random.default_rng(derive_seed(*base, 3, i)), self.follow_poll,
                              self.follow_timeout)
            streams.append(stream_samples(pool.urls_forever()))
        picks = choose.choice(len(self.sets), size=count, p=weights / weights.sum())
        for source in picks:
            sample = next(streams[source])
            sample["__source__"] = int(source)
            yield sample

    def _exact(self, epoch: int, steps: set[int]) -> Iterator[dict[str, Any]]:
        """This reader's samples of one exact epoch (see the module docstring), padded on ranks
        whose share is one short."""
        shards = self._exact_shards
        source = {url: i for url, _, i in shards}
        order = np.random.default_rng(derive_seed(self.seed, epoch, 0)).permutation(len(shards))
        urls = ({"url": shards[i][0]} for i in order)
        rank_total = len(range(self.rank, self.num_samples, self.world_size))
        padded_total = -(-self.num_samples // self.world_size)
        first = None
        for position, sample in enumerate(stream_samples(urls)):
            if position % self.world_size != self.rank:
                continue
            q = position // self.world_size
            sample["__source__"] = source[sample["__url__"]]
            first = first or sample
            if q // self.batch_size in steps:
                yield sample
        for q in range(rank_total, padded_total):
            if q // self.batch_size in steps and first is not None:
                yield dict(first)

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Collate consecutive groups of ``batch_size`` samples (the last may be short)."""
        group: list[dict[str, Any]] = []
        for sample in samples:
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._collate(group)
                group = []
        if group:
            yield self._collate(group)

    def _collate(self, group: list[dict[str, Any]]) -> dict[str, Any]:
        """Decode and check one batch: images uint8 NCHW, labels, source indices, keys."""
        images, labels = [], []
        for sample in group:  # the checks of every shard reader (gen/data/shards/read.py), pixel cap included
            url = sample["__url__"]
            image = decode_sample_image(url, sample)
            if image.shape != self.image_shape:
                raise ShardError(f"{sample_location(url, sample)} has shape {tuple(image.shape)}; the training data "
                                 f"is {self.image_shape}")
            images.append(image)
            if "cls" not in sample:
                raise ShardError(f"{sample_location(url, sample)} lacks ['cls']")
            labels.append(parse_label(url, sample, self.num_classes))
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long),
                "source": torch.tensor([sample["__source__"] for sample in group], dtype=torch.long),
                "keys": [sample["__key__"] for sample in group]}


#: A tensor sent from a loader worker to the trainer goes through shared memory: a file descriptor
#: passed and mapped per tensor, about 1.4 ms each on the 2-core CPU whatever its size, i.e. 4 ms for
#: a batch of 128 8x8 images with its labels and sources, a third of the reader's own work. A numpy
#: array is pickled through the worker's pipe instead (0.05 ms for that batch). Arrays up to this
#: size take the pipe (`tailforge bench stream`: pipeline with one worker, steady rate); larger ones
#: keep shared memory, which does not copy them.
PIPE_MAX_BYTES = 1 << 20


def _unchanged(batch: dict[str, Any]) -> dict[str, Any]:
    """DataLoader's collate_fn: batches are made by the readers and arrays stay arrays on the pipe
    (the default, default_convert, would turn them back into tensors inside the worker)."""
    return batch


def _for_pipe(batch: dict[str, Any]) -> dict[str, Any]:
    """A worker's batch with its small tensors as numpy arrays (see PIPE_MAX_BYTES)."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) and v.nbytes <= PIPE_MAX_BYTES else v
            for k, v in batch.items()}


def _from_pipe(batch: dict[str, Any]) -> dict[str, Any]:
    """The trainer's side of :func:`_for_pipe`: arrays back to tensors, without copying."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def resolve_sets(mix: Sequence[MixSource], real_root: str | Path | None, *, follow: bool = False) -> tuple[ShardSet, ...]:
    """MixSources -> ShardSets: ``real`` is read from ``real_root``; synthetic sets are followed
    (read from their records while a job writes them) when ``follow`` is set."""
    sets = []
    for source in mix:
        if source.name == REAL:
            if real_root is None:
                raise ConfigError("the mix names `real` but no real shard set was prepared")
            sets.append(ShardSet(REAL, str(real_root), source.weight))
        else:
            sets.append(ShardSet(source.name, source.path, source.weight, follow=follow))
    return tuple(sets)
