"""Ray Data: a shard set as a ``ray.data.Dataset``, and a Ray Dataset as a classifier's training source.

:func:`read_shard_set` reads the shards a set's manifest lists (gen/data/shards/: ``_info.json``;
temporaries and shards without a record are never listed, so never read) through
``ray.data.read_webdataset``, each sample checked by the one sample decoder every reader of ours
uses (gen/data/shards/read.py: capped PNG decoding, labels below the manifest's num_classes, valid
json). Rows are

    key    the sample key, ``{job}-{index:09d}``
    image  uint8 array, C x H x W
    label  int
    json   the sample's json as a dict, exactly as ``json.loads`` gives it

The json column holds Python objects rather than an Arrow struct: Arrow would give every row the
union of the keys of its block (absent keys as None) and one type per key (ints beside floats
become floats), so rows would no longer be the json that was written.

:class:`RayDataStream` feeds any Dataset with ``image`` and ``label`` columns (and optionally
``key``) to the classifier trainer (train/classifier.py ``train_classifier(..., ray_dataset=ds)``):
it yields the batch dicts :class:`~tailforge.train.streams.MixedStream` yields, so the training
loop is the same for both sources. This is the only module besides gen/jobs/ray.py and
train/ray_train.py that imports Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.extensions import ArrowPythonObjectArray

from tailforge.gen.core.errors import ShardError
from tailforge.gen.core.noise import derive_seed
from tailforge.gen.data.shards.read import decode_sample, shard_entries
from tailforge.train.config import MixSource

RAY_DATA = "ray_data"  # the source name of a Ray Dataset in the training log's observed mix


def read_shard_set(root: str | os.PathLike, split: str = "train", **read_args: Any) -> ray.data.Dataset:
    """The samples of a shard set's split (a path or URL) as a Dataset of ``key``, ``image``,
    ``label`` and ``json`` rows (see the module docstring), in manifest order: the read keeps its
    order (DataContext ``preserve_order``), so a seeded shuffle downstream is reproducible.
    ``read_args`` go to ``ray.data.read_webdataset`` (e.g. ``filesystem``, ``override_num_blocks``)."""
    entries = shard_entries(root, split)
    if not entries:
        raise ShardError(f"shard set {root} lists no shards in split {split!r}")
    num_classes = entries[0].num_classes
    dataset = ray.data.read_webdataset([entry.url for entry in entries],
                                       decoder=functools.partial(_decode, num_classes=num_classes), **read_args)
    dataset.context.execution_options.preserve_order = True
    return dataset.map_batches(_parse_json, batch_format="pyarrow")


def _decode(raw: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
    """One raw webdataset sample -> a row (json still text: see :func:`_parse_json`), through the
    checks of gen/data/shards/read.py's decode_sample."""
    sample = decode_sample(raw["__url__"], raw, num_classes)
    return {"key": sample["key"], "image": sample["image"], "label": sample["label"],
            "json": raw["json"].decode("utf-8") if "json" in raw else "{}"}


def _parse_json(table: pa.Table) -> pa.Table:
    """The json text column as a column of the parsed dicts, kept as Python objects."""
    parsed = ArrowPythonObjectArray.from_objects([json.loads(text) for text in table.column("json").to_pylist()])
    return table.set_column(table.schema.get_field_index("json"), "json", parsed)


@dataclasses.dataclass(frozen=True)
class RayDataStream:
    """A Ray Dataset as the classifier trainer's stream (the interface of train/streams.py's
    MixedStream: ``sets``, ``steps_per_epoch``, ``at``, ``batches``). Every epoch is one pass over
    the Dataset, in batches of ``batch_size`` rows (the last may be short), shuffled through a
    local buffer seeded by (seed, epoch); a run resumed at epoch k sees the batches the
    uninterrupted run saw when the Dataset yields its rows in a fixed order (read_shard_set's does).
    The Dataset is iterated in this process: one rank (Ray Train's ``get_dataset_shard`` is the way
    to several)."""

    dataset: Any  # a ray.data.Dataset with "image" (uint8 C x H x W) and "label" columns
    batch_size: int  # rows per batch
    image_shape: tuple[int, int, int]  # C, H, W every image must have
    num_classes: int  # labels must lie in [0, num_classes)
    start_epoch: int = 0  # first epoch to yield
    end_epoch: int = 1  # one past the last epoch
    shuffle_buffer: int = 1000  # rows in the local shuffle buffer (0: the Dataset's own order)
    seed: int = 0  # run seed

    @property
    def sets(self) -> tuple[MixSource, ...]:
        """The one source of the mix, for the training log."""
        return (MixSource(RAY_DATA, 1.0),)

    @functools.cached_property
    def num_rows(self) -> int:
        """Rows per epoch (counting a read that has not run yet reads it once)."""
        rows = self.dataset.count()
        if rows == 0:
            raise ShardError("the Ray Dataset holds no rows")
        return rows

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def at(self, start_epoch: int, end_epoch: int) -> RayDataStream:
        stream = dataclasses.replace(self, start_epoch=start_epoch, end_epoch=end_epoch)
        stream.__dict__["num_rows"] = self.num_rows  # counted once per run
        return stream

    def batches(self) -> Iterator[dict[str, Any]]:
        """Every batch of epochs [start_epoch, end_epoch): "images" (uint8 NCHW), "labels"
        (int64), "source" (zeros: one source), "keys" and "step" (epoch * steps_per_epoch + step)."""
        steps = self.steps_per_epoch
        for epoch in range(self.start_epoch, self.end_epoch):
            made = 0
            for step, batch in enumerate(self.dataset.iter_batches(
                    batch_size=self.batch_size, batch_format="numpy",
                    local_shuffle_buffer_size=self.shuffle_buffer or None,
                    local_shuffle_seed=derive_seed(self.seed, epoch) if self.shuffle_buffer else None)):
                made += 1
                if step < steps:
                    yield {**self.collate(batch), "step": epoch * steps + step}
            if made != steps:
                raise ShardError(f"the Ray Dataset gave {made} batches of {self.batch_size} in epoch {epoch + 1}, "
                                 f"{steps} when it was counted ({self.num_rows} rows): its size changed")

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A numpy batch of rows as MixedStream's batch dict, its images and labels checked."""
        missing = [column for column in ("image", "label") if column not in batch]
        if missing:
            raise ShardError(f"Ray Dataset rows lack the columns {missing} (they have {sorted(batch)}); the trainer "
                             "needs 'image' (uint8 C x H x W) and 'label' (int), as read_shard_set gives them")
        images, labels = batch["image"], np.asarray(batch["label"])
        keys = [str(key) for key in batch["key"]] if "key" in batch else [""] * len(labels)
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
            shape = tuple(images.shape[1:]) if images.dtype != object else "ragged"
            raise ShardError(f"Ray Dataset column 'image' holds {images.dtype} images of shape {shape}; the training "
                             f"data is uint8 {self.image_shape}")
        if labels.dtype.kind not in "iu":
            raise ShardError(f"Ray Dataset column 'label' holds {labels.dtype} values; labels are integers")
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if len(bad):
            raise ShardError(f"Ray Dataset row {keys[bad[0]] or bad[0]!r}: label {labels[bad[0]]} is not in "
                             f"[0, {self.num_classes})")
        return {"images": torch.from_numpy(np.ascontiguousarray(images)),
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "source": torch.zeros(len(labels), dtype=torch.long), "keys": keys}
