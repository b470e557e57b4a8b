"""The Python API's own pieces: thin functions and modules over the code the CLI runs.

``import tailforge`` re-exports these lazily (see the package's ``__init__``), so this module may
import torch. Nothing here re-implements a method: sampling is
:func:`tailforge.gen.diffusion.samplers.generate_batch`, DiffAug is
:func:`tailforge.gen.methods.diffaug.augment_images` (Sastry et al. 2023, Eq. 3), the stream is the
trainer's :class:`tailforge.train.streams.MixedStream`, a generation job is
:func:`tailforge.gen.jobs.runner.run_config_job`, and the evaluations are the eval modules' pure
functions with their results put into small frozen dataclasses.

Value ranges: inside tailforge images are float NCHW in [-1, 1] (or uint8 at the edges). A user's
training loop often holds [0, 1] floats (torchvision's ``ToTensor``); :class:`DiffAug` and
:func:`diffaug_ensemble` take ``value_range=(0, 1)`` for those and return the same range.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from tailforge.eval.accuracy import expected_calibration_error, per_class_accuracy
from tailforge.eval.entropy import output_entropy
from tailforge.eval.stats import Interval, proportion_interval
from tailforge.gen.core.errors import ConfigError, ShardError
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.data.shards.format import ShardRecord
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.denoiser import ClampDenoised
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.methods.diffaug import ENSEMBLE_TIMES, DiffAugEnsemble, augment_images
from tailforge.gen.methods.replicas import RATIO_THRESHOLD, nearest_two, ratio_criterion
from tailforge.gen.models.classifiers import predict_logits
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model
from tailforge.train.streams import MixedStream, ShardSet

ModelLike = DiffusionModel | str | os.PathLike
#: the value ranges a user's float images may be in: tailforge's own [-1, 1], or [0, 1]
VALUE_RANGES = ((-1.0, 1.0), (0.0, 1.0))
#: slack allowed outside the value range (float rounding of a user's own normalisation)
RANGE_SLACK = 1e-3


def _model(model: ModelLike, device: str | torch.device | None = None) -> DiffusionModel:
    """A loaded model, or the model folder `model` loaded (on `device`, default the CPU)."""
    if isinstance(model, DiffusionModel):
        return model
    return load_diffusion_model(model, device or "cpu")


# ------------------------------------------------------------------------------------------------
# Sampling


def sample(model: ModelLike, n: int | None = None, *, labels: Sequence[int] | Tensor | None = None, seed: int = 0,
           sampling: SamplingConfig | None = None, batch_size: int = 128, **settings: Any) -> Tensor:
    """Sample images from a diffusion model; returns uint8 NCHW on the CPU.

    ``model`` is a loaded :class:`DiffusionModel` or a model folder (ours, or a diffusers
    ``UNet2DModel`` folder). Give ``n`` for class-balanced labels (sample i gets class i mod C,
    what ``tailforge gen baseline`` does) or ``labels`` (one per sample) for a class-conditional
    model. Sampler settings are a :class:`SamplingConfig` or its fields as keywords
    (``sample(model, 16, sampler="ddim", steps=50)``). Sample i's noise comes from (seed, i) alone,
    so the result does not depend on ``batch_size`` and equals sample i of
    ``tailforge gen baseline`` with the same seed and settings.
    """
    model = _model(model)
    if sampling is not None and settings:
        raise ConfigError(f"give either sampling= or sampler settings {sorted(settings)}, not both")
    sampling = sampling if sampling is not None else SamplingConfig(**settings)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if labels is not None:
        if model.meta.num_classes is None:
            raise ConfigError(f"{model.path} is an unconditional model; it takes no labels")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if n is not None and n != len(labels):
            raise ConfigError(f"n = {n} but {len(labels)} labels were given; give one of them")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < model.meta.num_classes):
            raise ConfigError(f"labels must lie in [0, {model.meta.num_classes}); got {labels.min()}..{labels.max()}")
        n = len(labels)
    elif n is None or n < 1:
        raise ConfigError(f"give n >= 1 (number of samples) or labels; got n = {n}")
    else:
        labels = balanced_labels(range(n), model.meta.num_classes)
    chunks = []
    for first in range(0, n, batch_size):
        indices = list(range(first, min(first + batch_size, n)))
        chunks.append(generate_batch(model, sampling, seed, indices, None if labels is None else labels[indices]))
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------
# DiffAug in a user's training loop


def _value_range(value_range: Sequence[float]) -> tuple[float, float]:
    pair = tuple(float(v) for v in value_range)
    if pair not in VALUE_RANGES:
        raise ConfigError(f"value_range {tuple(value_range)} is not one of {VALUE_RANGES}")
    return pair  # type: ignore[return-value]


def to_model_range(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    """[low, high] floats -> the [-1, 1] the diffusion model works in."""
    low, high = value_range
    return images if value_range == (-1.0, 1.0) else (images - low) * (2.0 / (high - low)) - 1.0


def from_model_range(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    """The inverse of :func:`to_model_range`."""
    low, high = value_range
    return images if value_range == (-1.0, 1.0) else (images + 1.0) * ((high - low) / 2.0) + low


def check_images(images: Tensor, meta, value_range: tuple[float, float], device: torch.device, what: str) -> None:
    """One-line ConfigError unless `images` is a float NCHW batch of the model's channels and size,
    on the model's device, inside `value_range`."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"{what} takes float image tensors, got {kind}; convert uint8 with images.float() / 255 "
                          "and value_range=(0, 1)")
    expected = (meta.channels, meta.image_size, meta.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ConfigError(f"{what} takes NCHW images of shape [N, {', '.join(map(str, expected))}] (the diffusion "
                          f"model's channels and size), got {list(images.shape)}")
    if images.device != device:
        raise ConfigError(f"images are on {images.device} but {what} is on {device}; move one with .to()")
    low, high = value_range
    lo, hi = (float(images.min()), float(images.max())) if images.numel() else (low, high)
    if lo < low - RANGE_SLACK or hi > high + RANGE_SLACK:
        other = next(r for r in VALUE_RANGES if r != value_range)
        raise ConfigError(f"{what} expects values in [{low:g}, {high:g}] (value_range={value_range}), got "
                          f"[{lo:.3g}, {hi:.3g}]; pass value_range={other} if that is your range")


class DiffAug(nn.Module):
    """DiffAug (Sastry et al. 2023, Eq. 3) as an ``nn.Module`` for any training loop.

    ``DiffAug(model)(images)`` diffuses each image to its own random t ~ U{0, ..., T - 1} and returns
    the denoiser's one-step estimate of the clean image: float NCHW of the input's shape, range
    and device, without gradients (an augmentation). Train on the clean and the augmented batch
    together, as the paper does: ``loss = CE(f(x), y) + CE(f(DiffAug(x)), y)``.

    * ``model``: a :class:`DiffusionModel` or a model folder, unconditional or trained with label
      dropout; a class-conditional model without a null class needs ``labels`` in ``forward``.
    * ``value_range``: (-1, 1) (tailforge's convention) or (0, 1) (torchvision's ``ToTensor``).
    * ``seed``: call k draws row r's t and noise from the generator of (seed, k, r), as
      ``tailforge train classifier --diffaug`` does for batch k; ``forward(batch_index=)`` picks k.
    * ``clip_denoised``: clamp the estimate to the data range, as the trainer does.

    Move it with ``.to(device)`` like any module; wrong dtype, shape, channels, device or value
    range is a one-line :class:`~tailforge.gen.core.errors.ConfigError`.
    """

    def __init__(self, model: ModelLike, *, value_range: Sequence[float] = (-1.0, 1.0), seed: int = 0,
                 clip_denoised: bool = True):
        super().__init__()
        loaded = _model(model)
        self.meta = loaded.meta
        self.denoiser = ClampDenoised(loaded.denoiser) if clip_denoised else loaded.denoiser
        self.value_range = _value_range(value_range)
        self.seed = int(seed)
        self.batches_seen = 0  # the next call's batch index

    def forward(self, images: Tensor, labels: Tensor | None = None, *, batch_index: int | None = None) -> Tensor:
        device = self.denoiser.train_sigmas.device
        check_images(images, self.meta, self.value_range, device, "DiffAug")
        if self.meta.denoises_without_labels:
            labels = None
        elif labels is None:
            raise ConfigError("this DiffAug model is class-conditional without a null class: pass the batch's labels "
                              "(or train the model with --unconditional or --label-dropout)")
        else:
            labels = labels.to(device)
        index = self.batches_seen if batch_index is None else int(batch_index)
        self.batches_seen = index + 1
        x0 = to_model_range(images.float(), self.value_range)
        out = augment_images(self.denoiser, x0, labels, self.seed, index)
        return from_model_range(out, self.value_range).to(images.dtype)


class _FromModelRange(nn.Module):
    """A user's classifier behind DiffAug-Ensemble: it receives [-1, 1] estimates and sees them in
    its own value range."""

    def __init__(self, classifier: nn.Module, value_range: tuple[float, float]):
        super().__init__()
        self.classifier, self.value_range = classifier, value_range

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(from_model_range(images, self.value_range))


class _RangeChecked(nn.Module):
    """DiffAug-Ensemble with the user's value range checked and converted on the way in."""

    def __init__(self, ensemble: DiffAugEnsemble, meta, value_range: tuple[float, float]):
        super().__init__()
        self.ensemble, self.meta, self.value_range = ensemble, meta, value_range

    def forward(self, images: Tensor) -> Tensor:
        device = self.ensemble.denoiser.train_sigmas.device
        if images.dtype == torch.uint8:  # stored images (0..255) are mapped to [-1, 1] whatever value_range is
            x0 = uint8_to_float(images)
            check_images(x0, self.meta, (-1.0, 1.0), device, "DiffAug-Ensemble")
        else:
            check_images(images, self.meta, self.value_range, device, "DiffAug-Ensemble")
            x0 = to_model_range(images.float(), self.value_range)
        return self.ensemble(x0)


def diffaug_ensemble(classifier: nn.Module, model: ModelLike, *, value_range: Sequence[float] = (-1.0, 1.0),
                     times: Sequence[int] = ENSEMBLE_TIMES, seed: int = 0, clip_denoised: bool = True) -> nn.Module:
    """DiffAug-Ensemble (Sastry et al. 2023): `classifier` averaged over DiffAug at t in
    S = {0, 50, ..., 450}, as an ``nn.Module`` returning **log-probabilities** (softmax of the
    output is the ensemble's mean probability; argmax and cross-entropy work unchanged).

    ``model`` must denoise without labels (unconditional, or trained with label dropout).
    ``value_range`` is the range of the images it is called with, which is also the range the
    classifier is given; uint8 images (0..255) are taken too. Each image's noise is seeded by (seed, a hash of the image), so a
    prediction does not depend on the batch it came in. The module is on the classifier's device.
    """
    value_range = _value_range(value_range)
    loaded = _model(model, next(classifier.parameters()).device)
    if not loaded.meta.denoises_without_labels:
        raise ConfigError(f"{loaded.path} is a class-conditional model without a null class; DiffAug-Ensemble runs "
                          "without labels and needs an unconditional one (or one trained with --label-dropout)")
    inner = classifier if value_range == (-1.0, 1.0) else _FromModelRange(classifier, value_range)
    ensemble = DiffAugEnsemble(inner, loaded.denoiser, times, seed, clip_denoised)
    return _RangeChecked(ensemble, loaded.meta, value_range).eval()


# ------------------------------------------------------------------------------------------------
# Shard sets as a PyTorch IterableDataset


def _distributed_layout(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when a process group is up, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if (rank is None) != (world_size is None):
        raise ConfigError("give both rank and world_size, or neither (then torch.distributed's are used)")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _image_shape_and_classes(sets: Sequence[ShardSet]) -> tuple[tuple[int, int, int], int | None]:
    """The shards' image shape (C, H, W; from the first sample, which every other must match) and the
    largest ``num_classes`` their manifests record (None when none does)."""
    from tailforge.gen.data.shards.read import iter_samples, read_manifest

    classes = [read_manifest(s.root).get("num_classes") for s in sets]
    first = next(iter_samples(sets[0].root), None)
    if first is None:
        raise ShardError(f"shard set {sets[0].root} holds no samples")
    known = [c for c in classes if c]
    return tuple(first["image"].shape), max(known) if known else None  # type: ignore[return-value]


def open_shards(sources: str | os.PathLike | Mapping[str | os.PathLike, float], *, batch_size: int,
                epochs: int = 1, epoch_samples: int = 0, resample: bool = True, start_epoch: int = 0,
                rank: int | None = None, world_size: int | None = None, loader_workers: int = 0,
                shuffle_buffer: int = 1000, seed: int = 0, num_classes: int | None = None) -> MixedStream:
    """Shard sets (written by ``tailforge gen``, or any set with our ``_info.json``) as the
    trainer's PyTorch ``IterableDataset`` (:class:`tailforge.train.streams.MixedStream`).

    ``sources`` is one shard-set folder (or fsspec URL), or a mapping folder -> weight for a mix of
    real and synthetic sets (``{"runs/real": 1.0, "runs/lowdensity": 0.3}``). It yields batches,
    dicts of "images" (uint8 NCHW), "labels", "source" (index into ``sources``), "keys" and "step".

    * resampled epochs (default): every batch's sources drawn by weight, shards with replacement;
      an epoch is ``epoch_samples`` samples over all ranks (0: the sets' total size);
    * ``resample=False``: every sample of every set once per epoch (weights must be 1);
    * DDP: rank ``rank`` of ``world_size`` takes its own share of every epoch (default: the
      torch.distributed process group's, when one is initialised, else the whole stream);
    * ``loader_workers``: read it with ``DataLoader(stream, batch_size=None,
      num_workers=loader_workers)``, or simply iterate ``stream.batches()``, which does that.
    """
    mix = {str(sources): 1.0} if isinstance(sources, (str, os.PathLike)) else {str(k): float(v)
                                                                               for k, v in sources.items()}
    names = [Path(root).name or root for root in mix]
    if len(set(names)) != len(names):
        raise ConfigError(f"shard sets {sorted(mix)} share a folder name; the stream names each source by it")
    sets = tuple(ShardSet(name, root, weight) for name, (root, weight) in zip(names, mix.items()))
    if not sets:
        raise ConfigError("open_shards needs at least one shard set")
    image_shape, recorded_classes = _image_shape_and_classes(sets)
    num_classes = num_classes or recorded_classes
    if num_classes is None:
        raise ConfigError(f"no manifest of {sorted(mix)} records num_classes; pass num_classes=")
    if resample and not epoch_samples:
        epoch_samples = sum(n for s in sets for _, n in s.shards())
    rank, world_size = _distributed_layout(rank, world_size)
    return MixedStream(sets, batch_size=batch_size, image_shape=image_shape, num_classes=num_classes,
                       epoch_samples=epoch_samples, resample=resample, start_epoch=start_epoch, end_epoch=epochs,
                       rank=rank, world_size=world_size, loader_workers=loader_workers,
                       shuffle_buffer=shuffle_buffer, seed=seed)


# ------------------------------------------------------------------------------------------------
# Generation jobs


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What a generation job wrote."""

    out: str  # the shard-set folder (or URL)
    records: tuple[ShardRecord, ...]  # one per shard, in shard order (name, count, sha256, seconds, ...)

    @property
    def samples(self) -> int:
        """Samples in the set."""
        return sum(r.count for r in self.records)

    @property
    def seconds(self) -> float:
        """Time spent producing the shards (summed over shards, so over actors too)."""
        return sum(r.seconds for r in self.records)


def generate(config, out: str | os.PathLike, *, actors: int | None = 0, address: str | None = None,
             progress: bool = False, force: bool = False) -> GenerationResult:
    """Run a generation job from Python: ``tailforge gen baseline | lowdensity | reconstruct``.

    ``config`` is a :class:`BaselineConfig`, :class:`LowDensityConfig` or :class:`ReconstructConfig`
    (one t_re; the CLI's ``--t-re`` list runs one such job per value). ``actors=0`` runs in this
    process without Ray; ``actors=N`` (or None: one per GPU, two on a CPU-only machine) runs a Ray
    actor pool, joining ``address`` / $RAY_ADDRESS or starting a local instance. The shards are the
    same bytes either way. Re-running the same call resumes: recorded shards are kept.
    """
    from tailforge.gen.jobs.runner import run_generation

    records = run_generation(out, config, actors=actors, address=address, progress=progress, force=force)
    return GenerationResult(str(out), tuple(records))


# ------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    """A classifier's accuracy on labelled images."""

    top1: Interval  # top-1 accuracy with its exact (Clopper-Pearson) interval; .items = images scored
    ece: float  # expected calibration error (Guo et al. 2017, 15 bins)
    per_class: tuple[float | None, ...]  # accuracy per true class (None: no image of that class)

    @property
    def items(self) -> int:
        """Images the accuracy rests on."""
        return self.top1.items


def _logits(classifier: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if len(images) != len(labels) or len(labels) == 0:
        raise ConfigError(f"need one label per image and at least one image; got {len(images)} images and "
                          f"{len(labels)} labels")
    return predict_logits(classifier, images), labels


def evaluate_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor | Sequence[int], *,
                      num_classes: int | None = None, level: float = 0.95) -> AccuracyResult:
    """Top-1 accuracy (with its Clopper-Pearson interval), ECE and per-class accuracy of
    `classifier` on `images` (uint8 NCHW, mapped to [-1, 1], or floats in the range the classifier
    expects) with `labels`; batched, in eval mode, on the classifier's device."""
    logits, labels = _logits(classifier, images, labels)
    num_classes = num_classes or logits.shape[1]
    correct = logits.argmax(1) == labels
    return AccuracyResult(top1=proportion_interval(correct.numpy(), level=level),
                          ece=expected_calibration_error(logits.softmax(1), labels),
                          per_class=tuple(per_class_accuracy(logits, labels, num_classes)))


@dataclasses.dataclass(frozen=True)
class EntropyResult:
    """Output entropy of a classifier on a set (Yamaguchi & Fukuda 2023, Eq. 4)."""

    mean_entropy: float  # mean over images of the entropy (nats) of softmax(logits)
    max_entropy: float  # log(num_classes): the entropy of a uniform prediction
    per_class: tuple[float | None, ...]  # mean entropy per true class (None: no image of that class)
    items: int  # images it rests on


def evaluate_entropy(classifier: nn.Module, images: Tensor, labels: Tensor | Sequence[int], *,
                     num_classes: int | None = None) -> EntropyResult:
    """Output entropy (Yamaguchi & Fukuda 2023, Eq. 4) of `classifier` on `images`, overall and per class."""
    logits, labels = _logits(classifier, images, labels)
    num_classes = num_classes or logits.shape[1]
    entropy = output_entropy(logits)
    per_class = tuple(float(entropy[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes))
    return EntropyResult(float(entropy.mean()), float(torch.log(torch.tensor(float(num_classes)))), per_class,
                         len(labels))


@dataclasses.dataclass(frozen=True)
class MemorizationResult:
    """Replicates of the training set among generated images (ratio criterion, Yoon et al. 2023
    Sec. 3.1; Gu et al. 2023's memorization ratio)."""

    ratio: Interval  # share of generated images that are replicates, with its Clopper-Pearson interval
    replicates: int  # generated images that are replicates
    distinct_train_images_replicated: int  # training images that some replicate copies
    threshold: float  # replicate when d1 < threshold * d2
    d1_over_d2: Tensor  # float64 [N]: each generated image's nearest / second-nearest training distance

    @property
    def items(self) -> int:
        """Generated images it rests on."""
        return self.ratio.items


def evaluate_memorization(generated: Tensor, train: Tensor, *, threshold: float = RATIO_THRESHOLD,
                          level: float = 0.95, device: str | None = None) -> MemorizationResult:
    """Ratio criterion of every generated image against the training images (both uint8 NCHW or
    [-1, 1] floats), in pixel space with exact nearest neighbours, as both memorization papers
    measure: a replicate when ||W - NN1|| < threshold * ||W - NN2|| (threshold 1/3)."""
    nn2 = nearest_two(generated, train, device=device)
    replicate = ratio_criterion(nn2.d1, nn2.d2, threshold)
    return MemorizationResult(ratio=proportion_interval(replicate.numpy(), level=level),
                              replicates=int(replicate.sum()),
                              distinct_train_images_replicated=int(len(torch.unique(nn2.i1[replicate]))),
                              threshold=threshold, d1_over_d2=nn2.ratio)
