"""The memorization gate: replicas of the training set are dropped before a shard is published,
and refilled so the shard keeps its planned count.

Every sample a gated job writes records its ratio d1 / d2 against the training set the model was
trained on (the ratio criterion of Yoon et al. 2023 Section 3.1 and Gu et al. 2023 Section 2, in
pixel space; gen/methods/replicas.py). A sample whose ratio criterion holds at the job's
``max_nn_ratio`` R (d1 < R * d2) is a replica and is replaced.

Refills are deterministic, so a gated shard's bytes depend only on its spec, whatever the number
of actors or the batch size. Planned sample i (its slot) tries the candidates

    i, i + stride, i + 2 * stride, ...      stride = num rounded up to a multiple of the classes

in order and keeps the first that is not a replica; candidate c's noise comes from
(job_seed, c) (gen/core/noise.py). Candidates of different slots never coincide (stride >= num),
and c mod num_classes = i mod num_classes, so a candidate's own class-balanced label is its slot's
planned label: labels stay exactly as balanced as without the gate. The kept sample keeps its
slot's key and ``index``; its json adds ``noise_index`` (c), ``nn_ratio`` and ``nn_train_key``
(the nearest training image). A slot's first candidate is the sample the ungated job makes, so
gating changes only the replicas. The shard is generated in rounds (every slot still open tries its
next candidate, in batches of ``batch_size``); a shard may spend at most
MAX_CANDIDATES_PER_SAMPLE x its count candidates, and one that needs more ends the job with one
line naming it, before anything of it is published.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch
from torch import Tensor

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError, DatasetError
from tailforge.gen.data.datasets import LabeledImages, load_dataset
from tailforge.gen.data.shards.format import ShardSpec
from tailforge.gen.methods.replicas import flat_pixels, nearest_two, ratio_criterion
from tailforge.gen.models.diffusion import DiffusionModel

#: a shard may try at most this many candidates per planned sample before the job gives up
MAX_CANDIDATES_PER_SAMPLE = 20

#: (uint8 NCHW images, labels, per-row json fields) of the samples with these noise indices
Generate = Callable[[list[int]], tuple[Tensor, list[int], list[dict[str, Any]]]]


def candidate_stride(num: int, num_classes: int | None) -> int:
    """The step between a slot's candidates: `num` rounded up to a multiple of the classes, so
    candidates never collide with another slot's and keep their slot's label i mod num_classes."""
    classes = num_classes or 1
    return math.ceil(num / classes) * classes


class ReplicaGate:
    """The gate of one job, held by its source: the training images (flattened, in pixel space)
    and the threshold; counts the replicas it dropped (``dropped``)."""

    def __init__(self, max_nn_ratio: float, train_images: Tensor, train_keys: list[str], stride: int,
                 device: str | torch.device | None = None):
        self.max_nn_ratio = max_nn_ratio
        self.device = default_device(device)
        self.train = flat_pixels(train_images).to(self.device)  # moved once, not per batch
        self.train_keys = train_keys
        self.stride = stride
        self.dropped = 0  # replicas dropped so far (produce_shard reads the difference per shard)

    def fill(self, spec: ShardSpec, generate: Generate, batch_size: int
             ) -> tuple[list[int], Tensor, list[int], list[dict[str, Any]]]:
        """The shard's (slots, uint8 NCHW images, labels, json fields), every one not a replica."""
        slots = list(spec.indices)
        kept: dict[int, tuple[Tensor, int, dict[str, Any]]] = {}
        budget, spent, attempt = MAX_CANDIDATES_PER_SAMPLE * len(slots), 0, 0
        pending = slots
        while pending:
            if spent + len(pending) > budget:
                raise ConfigError(
                    f"shard {spec.name}: {len(pending)} of its {len(slots)} samples are still replicas of the training set "
                    f"(d1/d2 < {self.max_nn_ratio}) after {budget} candidates ({MAX_CANDIDATES_PER_SAMPLE} per sample); "
                    "the model memorizes too much for this threshold: lower --max-nn-ratio or use a model trained on more images")
            spent += len(pending)
            replicas = []
            for first in range(0, len(pending), batch_size):
                batch = pending[first:first + batch_size]
                noise = [slot + attempt * self.stride for slot in batch]
                images, labels, rows = generate(noise)
                nn2 = nearest_two(images, self.train, device=self.device)
                replica = ratio_criterion(nn2.d1, nn2.d2, self.max_nn_ratio)
                for row, slot in enumerate(batch):
                    if replica[row]:
                        replicas.append(slot)
                        continue
                    kept[slot] = (images[row], labels[row], {
                        **rows[row], "noise_index": noise[row], "nn_ratio": round(float(nn2.ratio[row]), 6),
                        "nn_train_key": self.train_keys[int(nn2.i1[row])]})
            self.dropped += len(replicas)
            pending, attempt = replicas, attempt + 1
        return (slots, torch.stack([kept[slot][0] for slot in slots]), [kept[slot][1] for slot in slots],
                [kept[slot][2] for slot in slots])


def gate_training_set(train_dataset: str | None, model: DiffusionModel) -> LabeledImages:
    """The training split the gate compares against: `train_dataset` (a dataset spec), or by
    default the one the model folder records it was trained on; one line when it is unknown, cannot
    be loaded or does not match the model's images."""
    spec = train_dataset or model.meta.dataset
    if not spec or spec.startswith("diffusers:"):
        raise ConfigError(f"model folder {model.path} does not record the dataset it was trained on; the memorization "
                          "gate (max_nn_ratio) needs it: name it with train_dataset (--train-dataset SPEC)")
    try:
        train = load_dataset(spec, "train")
    except DatasetError as err:
        source = "train_dataset" if train_dataset else f"recorded in {model.path}"
        raise ConfigError(f"the memorization gate's training set ({source}: {spec!r}) cannot be loaded: {err}") from None
    meta = model.meta
    if (train.info.channels, train.info.image_size) != (meta.channels, meta.image_size):
        raise ConfigError(f"the memorization gate's training set {spec!r} has {train.info.channels}x{train.info.image_size}px "
                          f"images but the model in {model.path} makes {meta.channels}x{meta.image_size}px images")
    if len(train) < 2:
        raise ConfigError(f"the memorization gate's training set {spec!r} has {len(train)} image(s); d1/d2 needs at least 2")
    return train


def training_set_hash(train: LabeledImages) -> str:
    """sha256 (first 16 hex digits) of the training images' pixels, in order: what a gated job
    pins, so a resume against other training images is refused."""
    return hashlib.sha256(train.images.contiguous().numpy().tobytes()).hexdigest()[:16]


def replica_gate(max_nn_ratio: float | None, train_dataset: str | None, model: DiffusionModel, num: int,
                 device: str | torch.device | None = None) -> ReplicaGate | None:
    """The gate of a job at `max_nn_ratio` (None: no gate) against :func:`gate_training_set`."""
    if max_nn_ratio is None:
        return None
    train = gate_training_set(train_dataset, model)
    return ReplicaGate(max_nn_ratio, train.images, list(train.keys), candidate_stride(num, model.meta.num_classes),
                       device)
