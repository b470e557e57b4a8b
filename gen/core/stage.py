"""The augmentation-stage contract between a classifier trainer (train/classifier.py) and what
augments its batches (DiffAug: gen/methods/diffaug.py, gen/jobs/diffaug.py, gen/jobs/ray.py).

A *stage* is ``Callable[[Iterable[Batch]], Iterator[Batch]]``. A Batch is a dict with "images"
(float32 NCHW in [-1, 1], on the CPU), "labels" (int64), "index" (the batch's global index within
the run: ``(epoch * steps_per_epoch + step) * world_size + rank``, so it is deterministic, unique
across ranks and ``epoch * steps_per_epoch + step`` on one rank) and "seed" (the run seed); a
trainer may add keys of its own. A stage yields the same batches in the same order, each a new
dict with the added key "augmented" (float32, shaped like "images", on the CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

Batch = dict[str, Any]
Stage = Callable[[Iterable[Batch]], Iterator[Batch]]
