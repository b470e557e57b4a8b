"""Classifier training: any timm model on streamed real + synthetic shards (``train_classifier``)
or on an in-memory split (``fit_classifier``), in this process or on Ray Train (train/ray_train.py).

Both paths run the same loop (:func:`run_training`): AdamW or SGD, a cosine or step learning-rate
schedule with linear warmup (a pure function of the step, :func:`lr_at`), label smoothing, AMP on
CUDA, per-epoch checkpoints (safetensors + JSON, never pickles) with exact resume, a progress bar
and a JSONL log of per-epoch metrics.

Augmentation hook: a *stage* (the contract of gen/core/stage.py) adds an "augmented" tensor to
every batch. With a stage, the loss is CE(model(images), labels) + CE(model(augmented), labels),
computed from one forward pass over the concatenated batch: the released DiffAug recipe (Sastry et al. 2023;
shared/seeds/README.md). ``--diffaug MODEL_DIR`` builds the DiffAug stage of gen/methods/diffaug.py.

Data order is a function of (seed, epoch, rank, loader worker) only, and checkpoints hold the
weights, the optimizer state and the AMP scaler state, so a run resumed from the checkpoint of
epoch k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict, load_module_state
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.core.noise import derive_seed
from tailforge.gen.core.stage import Batch, Stage
from tailforge.gen.data.datasets import LabeledImages, load_dataset
from tailforge.gen.models.classifiers import (
    CLASSIFIER_WEIGHTS,
    create_classifier,
    load_classifier,
    predict_logits,
    save_classifier,
    write_classifier,
)
from tailforge.train.config import REAL, ClassifierTrainConfig
from tailforge.train.run_folder import (
    CheckpointFolders,
    load_optimizer,
    log_to_tensorboard,
    open_log,
    save_optimizer,
    tensorboard_folder,
)
from tailforge.train.streams import MixedStream, real_shard_root, resolve_sets, write_real_shards

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
# Settings that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = ("checkpoint_every", "follow_timeout")


# ------------------------------------------------------------------------------------------------
# Pure pieces


def lr_at(config: ClassifierTrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: linear warmup over
    the first ``warmup`` fraction, then cosine decay to 0, or a step decay by ``gamma`` every
    ``step_epochs`` epochs."""
    warm = int(config.warmup * total_steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "cosine":
        progress = (step - warm) / max(1, total_steps - warm)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * config.gamma ** (step // (config.step_epochs * steps_per_epoch))


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Sum over the batch's halves of the mean cross-entropy: ``logits`` hold one row per label
    (plain training) or two (clean rows then augmented rows: CE(clean) + CE(augmented), the
    DiffAug recipe)."""
    halves, rest = divmod(len(logits), len(labels))
    if rest or halves not in (1, 2):
        raise ConfigError(f"expected {len(labels)} or {2 * len(labels)} logit rows, got {len(logits)}")
    return sum(F.cross_entropy(part, labels, label_smoothing=label_smoothing) for part in logits.chunk(halves))


def build_optimizer(config: ClassifierTrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_diffaug_stage_for(config: ClassifierTrainConfig) -> Stage | None:
    """The DiffAug stage named by ``config.diffaug`` (gen/jobs/diffaug.py), or None."""
    if not config.diffaug:
        return None
    from tailforge.gen.jobs.diffaug import make_diffaug_stage

    return make_diffaug_stage(config.diffaug, actors=config.diffaug_actors, seed=config.seed)


# ------------------------------------------------------------------------------------------------
# One rank's training run


@dataclasses.dataclass
class RankContext:
    """Where one rank runs: its place in the world, its device, how its model is wrapped (DDP
    under Ray Train) and where each epoch's metrics are reported."""

    device: torch.device  # a device name is turned into a torch.device
    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model
    report: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


class Checkpoints:
    """``OUT/checkpoints/epoch-NNNN/`` (train/run_folder.py's CheckpointFolders): classifier.safetensors
    + classifier.json (the model), optimizer.safetensors + optimizer.json, state.json (epoch,
    config, AMP scaler); the newest ``keep`` are kept."""

    def __init__(self, folder: Path, config: ClassifierTrainConfig, model_config: dict[str, Any], keep: int = 2):
        self.folders = CheckpointFolders(folder, "epoch", 4, config_dict(config), RESUMABLE_CHANGES, keep)
        self.model_config = model_config

    def save(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        def write(folder: Path) -> None:
            write_classifier(folder, model, self.model_config)
            save_optimizer(optimizer, folder)

        self.folders.save(epoch, write, scaler=scaler.state_dict())

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
        """Load the newest checkpoint if any (the config must match); returns the epochs done."""
        found = self.folders.latest()
        if found is None:
            return 0
        latest, state = found
        load_module_state(model, latest / CLASSIFIER_WEIGHTS)
        load_optimizer(optimizer, latest)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])


def _all_reduce(values: Tensor, ctx: RankContext) -> Tensor:
    if ctx.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.to(ctx.device)
        torch.distributed.all_reduce(values)
    return values.cpu()


def _stage_inputs(batches: Iterable[Batch], seed: int, ctx: RankContext) -> Iterator[Batch]:
    """Loader batches (uint8) -> the stage contract's Batch (float32 in [-1, 1], index, seed)."""
    for batch in batches:
        yield {"images": uint8_to_float(batch["images"]), "labels": batch["labels"], "source": batch["source"],
               "index": int(batch["step"]) * ctx.world_size + ctx.rank, "seed": seed, "step": int(batch["step"])}


def run_training(config: ClassifierTrainConfig, model: nn.Module, make_batches: Callable[[int], Iterable[Batch]],
                 steps_per_epoch: int, ctx: RankContext, *, source_names: tuple[str, ...] = (REAL,),
                 test: LabeledImages | None = None, checkpoints: Checkpoints | None = None,
                 log_path: Path | None = None, stage: Stage | None = None, progress: bool = True) -> nn.Module:
    """Train ``model`` for the epochs ``config.epochs`` asks for (resuming from ``checkpoints``).

    ``make_batches(start_epoch)`` yields every batch of epochs start_epoch.. in global-step order
    (dicts with uint8 "images", "labels", "source" and "step"). Only rank 0 evaluates, logs and
    writes checkpoints; the per-epoch figures are summed over ranks first.
    """
    model = model.to(ctx.device)
    optimizer = build_optimizer(config, model)
    use_amp = config.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_amp)
    start = checkpoints.resume(model, optimizer, scaler) if checkpoints else 0
    trained = ctx.wrap(model)
    total_steps = config.epochs * steps_per_epoch
    batches = _stage_inputs(make_batches(start), config.seed, ctx)
    if stage is not None:
        batches = stage(batches)
    batches = iter(batches)
    bar = tqdm(total=total_steps, initial=start * steps_per_epoch, unit="step", desc=f"train {config.model}",
               disable=not (progress and ctx.is_chief))
    # entries of epochs after the checkpoint resumed from are dropped: they are redone
    log = open_log(log_path, lambda entry: entry.get("epoch", 0) <= start) if log_path and ctx.is_chief else None
    started = time.perf_counter()
    try:
        for epoch in range(start, config.epochs):
            trained.train()
            # loss sum, correct (clean half), samples, then samples per source
            totals = torch.zeros(3 + len(source_names), dtype=torch.float64)
            epoch_started = time.perf_counter()
            for step in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                batch = next(batches, None)
                if batch is None or batch["step"] != global_step:
                    raise RuntimeError(f"the input stream ended or fell out of order at step {global_step}")
                lr = lr_at(config, global_step, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch["images"].to(ctx.device, non_blocking=True)
                labels = batch["labels"].to(ctx.device, non_blocking=True)
                if stage is not None:
                    if "augmented" not in batch:
                        raise ConfigError("the augmentation stage returned a batch without 'augmented'")
                    images = torch.cat([images, batch["augmented"].to(ctx.device, non_blocking=True)])
                with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=use_amp):
                    logits = trained(images)
                loss = classification_loss(logits.float(), labels, config.label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                                             "lower --lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                n = len(labels)
                totals[0] += loss.item() * n
                totals[1] += (logits[:n].argmax(1) == labels).sum().item()
                totals[2] += n
                totals[3:] += torch.bincount(batch["source"], minlength=len(source_names)).double()
                bar.update(1)
            totals = _all_reduce(totals, ctx)
            seconds = time.perf_counter() - epoch_started
            entry = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr,
                     "train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2]),
                     "samples": int(totals[2]), "world_size": ctx.world_size,
                     "mix": {name: round(float(c / totals[2]), 4) for name, c in zip(source_names, totals[3:])},
                     "epoch_seconds": round(seconds, 3), "samples_per_second": round(float(totals[2]) / seconds, 1),
                     "seconds": round(time.perf_counter() - started, 2)}
            if ctx.is_chief:
                if test is not None:
                    entry["test_accuracy"] = accuracy(model, test)
                    bar.set_postfix(loss=f"{entry['train_loss']:.4f}", test_acc=f"{entry['test_accuracy']:.4f}")
                if checkpoints and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
                    checkpoints.save(epoch + 1, model, optimizer, scaler)
                if log:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
            if ctx.report:
                ctx.report(entry)
    finally:
        bar.close()
        if log:
            log.close()
        if hasattr(batches, "close"):
            batches.close()  # stops the loader workers
    return model.eval()


def accuracy(model: nn.Module, data: LabeledImages) -> float:
    return float((predict_logits(model, data.images).argmax(1) == data.labels).float().mean())


def new_classifier(config: ClassifierTrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    torch.manual_seed(config.seed)
    return create_classifier(config.model, num_classes=num_classes, in_chans=in_chans)


# ------------------------------------------------------------------------------------------------
# In memory


def memory_batches(data: LabeledImages, batch_size: int, seed: int, epochs: int) -> tuple[int, Callable[[int], Iterator[Batch]]]:
    """(steps per epoch, make_batches) over an in-memory split: a fresh permutation every epoch,
    seeded by (seed, epoch)."""
    steps = -(-len(data) // batch_size)
    source = torch.zeros(len(data), dtype=torch.long)

    def make(start: int) -> Iterator[Batch]:
        for epoch in range(start, epochs):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
            for step in range(steps):
                index = order[step * batch_size:(step + 1) * batch_size]
                yield {"images": data.images[index], "labels": data.labels[index], "source": source[index],
                       "step": epoch * steps + step}

    return steps, make


def fit_classifier(config: ClassifierTrainConfig, train: LabeledImages, test: LabeledImages | None = None, *,
                   device: str | None = None, progress: bool = True, log_path: Path | None = None,
                   stage: Stage | None = None) -> nn.Module:
    """Train ``config.model`` on an in-memory split in this process (no checkpoints); the stream
    settings of ``config`` (dataset, mix, workers, ...) are not used. Logs per-epoch metrics."""
    steps, make = memory_batches(train, config.batch_size, config.seed, config.epochs)
    model = new_classifier(config, train.info.num_classes, train.info.channels)
    return run_training(config, model, make, steps, RankContext(default_device(device)), test=test,
                        log_path=log_path, stage=stage if stage is not None else make_diffaug_stage_for(config),
                        progress=progress)


# ------------------------------------------------------------------------------------------------
# On streams


def build_stream(config: ClassifierTrainConfig, out: Path, test: LabeledImages, rank: int = 0,
                 world_size: int = 1) -> MixedStream:
    """Rank ``rank``'s stream for the whole run (``.at(start, epochs)`` selects the epochs)."""
    has_real = any(s.name == REAL for s in config.mix)
    sets = resolve_sets(config.mix, real_shard_root(config.dataset, out) if has_real else None, follow=config.follow)
    epoch_samples = config.epoch_samples
    if config.resample and not epoch_samples:
        if has_real:
            # one pass over the real data in expectation: real is weight / total of every epoch
            real = next(s for s in sets if s.name == REAL)
            total_weight = sum(s.weight for s in sets)
            epoch_samples = round(sum(n for _, n in real.shards()) * total_weight / real.weight)
        else:
            epoch_samples = sum(n for s in sets for _, n in s.shards())
    for shard_set in sets:  # a missing or damaged manifest is reported here, before any reader starts
        if not shard_set.follow:
            shard_set.shards()
    info = test.info
    return MixedStream(sets, batch_size=config.batch_size // world_size,
                       image_shape=(info.channels, info.image_size, info.image_size), num_classes=info.num_classes,
                       epoch_samples=epoch_samples, resample=config.resample, end_epoch=config.epochs, rank=rank,
                       world_size=world_size, loader_workers=config.loader_workers,
                       shuffle_buffer=config.shuffle_buffer, seed=config.seed, follow_timeout=config.follow_timeout)


def model_config(config: ClassifierTrainConfig, info) -> dict[str, Any]:
    return {"model": config.model, "num_classes": info.num_classes, "in_chans": info.channels,
            "image_size": info.image_size, "class_names": list(info.class_names), "train_config": config_dict(config)}


def train_rank(config: ClassifierTrainConfig, out: str | Path, ctx: RankContext, *, progress: bool = True,
               stage: Stage | None = None, ray_dataset: Any = None) -> tuple[nn.Module, float]:
    """One rank of a stream training run (the whole run when ``ctx.world_size`` is 1): rank 0
    writes checkpoints, the log and the final classifier to ``out``. With ``ray_dataset`` the
    batches come from that Ray Dataset (train/ray_data.py) instead of ``config.mix``."""
    out = Path(out)
    test = load_dataset(config.dataset, "test")
    if ray_dataset is None:
        stream = build_stream(config, out, test, ctx.rank, ctx.world_size)
    else:
        from tailforge.train.ray_data import RayDataStream

        info = test.info
        stream = RayDataStream(ray_dataset, config.batch_size, (info.channels, info.image_size, info.image_size),
                               info.num_classes, end_epoch=config.epochs, shuffle_buffer=config.shuffle_buffer,
                               seed=config.seed)
    model = new_classifier(config, test.info.num_classes, test.info.channels)
    meta = model_config(config, test.info)
    own_stage = stage is None
    stage = make_diffaug_stage_for(config) if own_stage else stage
    try:
        model = run_training(config, model, lambda start: stream.at(start, config.epochs).batches(),
                             stream.steps_per_epoch, ctx, source_names=tuple(s.name for s in stream.sets), test=test,
                             checkpoints=Checkpoints(out / CHECKPOINTS, config, meta), log_path=out / LOG_FILE,
                             stage=stage, progress=progress)
    finally:
        if own_stage and hasattr(stage, "close"):
            stage.close()
    test_accuracy = accuracy(model, test)
    if ctx.is_chief:
        save_classifier(out, model, {**meta, "test_accuracy": test_accuracy})
    return model, test_accuracy


def _ray_rank(config: ClassifierTrainConfig, out: str, progress: bool, stage: Stage | None, tensorboard: str | None,
              **placement: Any) -> None:
    """One Ray Train worker's rank (train/ray_train.py passes where it runs as RankContext's fields),
    mirroring its log to the driver's TensorBoard folder when it has one."""
    with log_to_tensorboard(tensorboard):
        train_rank(config, out, RankContext(**placement), progress=progress, stage=stage)


def train_classifier(config: ClassifierTrainConfig, out: str | Path, *, device: str | None = None,
                     progress: bool = True, address: str | None = None, stage: Stage | None = None,
                     report: Callable[[dict[str, Any]], None] | None = None,
                     ray_dataset: Any = None) -> tuple[nn.Module, float]:
    """Train on the dataset's training split streamed from shards, mixed with ``config.mix``'s
    synthetic shard sets; in this process, or on Ray Train when ``config.workers`` > 1 (joining
    ``address`` / $RAY_ADDRESS, else a local instance). Saves to ``out``; returns (model, test accuracy).
    A re-run of the same command resumes from the newest checkpoint. ``report`` receives each
    epoch's log entry (in-process runs; Ray Train runs report to Ray Train).

    ``ray_dataset``: a ``ray.data.Dataset`` with ``image`` (uint8 C x H x W) and ``label`` columns
    (train/ray_data.py: ``read_shard_set`` gives one, and any ``map_batches`` keeping them fits)
    replaces ``config.mix`` as the training data, one pass per epoch, in this process; the stream
    fields of ``config`` (mix, resample, epoch_samples, loader_workers, follow) are then unused."""
    if report is not None and config.workers > 1:
        raise ConfigError("report callbacks are for in-process runs; Ray Train workers report to Ray Train")
    if ray_dataset is not None and config.workers > 1:
        raise ConfigError(f"a Ray Dataset source trains in this process (workers 1), got workers {config.workers}; "
                          "for DDP ranks use --mix, whose shards every rank splits")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if ray_dataset is not None:
        return train_rank(config, out, RankContext(default_device(device), report=report), progress=progress,
                          stage=stage, ray_dataset=ray_dataset)
    real_root = real_shard_root(config.dataset, out)
    if any(s.name == REAL for s in config.mix) and real_root == out / "data" / REAL:
        write_real_shards(config.dataset, real_root)
    if config.workers > 1:
        from tailforge.train.ray_train import train_on_ray

        tensorboard = tensorboard_folder()
        rank_loop = functools.partial(_ray_rank, config, str(out.resolve()), progress, stage,
                                      str(tensorboard.resolve()) if tensorboard else None)
        train_on_ray(rank_loop, config.workers, out, address=address)
        model, saved = load_classifier(out)
        return model, float(saved["test_accuracy"])
    return train_rank(config, out, RankContext(default_device(device), report=report), progress=progress, stage=stage)
