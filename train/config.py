"""The training commands' configs (`tailforge train diffusion | classifier | guidance`) and the
names they are checked against, importable without torch; the trainers are diffusion.py,
classifier.py and guidance.py beside this module."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from tailforge.gen.core.checks import NonNegativeInt, OneOf, PositiveFloat, PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.config import BETA_SCHEDULES, SamplingConfig
from tailforge.gen.methods.config import GUIDANCE_INPUTS, SHRINKAGE
from tailforge.gen.models.config import UNET_PRESETS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
REAL = "real"


@dataclasses.dataclass(frozen=True)
class MixSource:
    """One source of a training mix."""

    name: str  # "real" (the dataset's training split) or a synthetic shard set's name
    weight: float  # relative sampling weight: P(source) = weight / sum of weights (resampled mode)
    path: str = ""  # shard-set folder; "" for the real dataset (resolved to its shards at run time)


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig:
    """`tailforge train diffusion`; copied into the model's tailforge.json."""

    dataset: str = "digits"  # dataset spec (training split is used)
    preset: Annotated[str, OneOf(UNET_PRESETS)] | None = None  # U-Net preset; None picks tiny (<= 16 px) or small
    beta_schedule: Annotated[str, OneOf(BETA_SCHEDULES)] = "linear"  # linear (DDPM) or cosine (improved DDPM)
    num_train_timesteps: PositiveInt = 1000  # T
    steps: PositiveInt = 2000  # optimizer steps
    batch_size: PositiveInt = 128  # images per step
    lr: PositiveFloat = 2e-3  # AdamW learning rate after warmup (2e-3 suits the tiny net; DDPM used 2e-4 at 35.7M)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: NonNegativeInt = 100  # linear learning-rate warmup (DDPM warms up over 5000 of 800k steps)
    grad_clip: float = 1.0  # gradient-norm clip (DDPM, Appendix B)
    ema_decay: float = 0.999  # EMA of the weights used for sampling (0.9999 in DDPM at 800k steps)
    class_conditional: bool = True  # learn a class embedding (False: unconditional model)
    # probability that a training label is replaced by an extra "null" class (classifier-free guidance's
    # p_uncond, Ho & Salimans 2022: 0.1-0.2); > 0 gives one model that also denoises without labels
    # (DiffAug, DiffAug-Ensemble) next to its class-conditional use
    label_dropout: float = 0.0
    hflip: bool | None = None  # random horizontal flips; None: only if the dataset allows it
    checkpoint_every: PositiveInt = 500  # steps between checkpoints (and resumable points)
    keep_checkpoints: PositiveInt = 2  # how many step-N checkpoints to keep
    seed: NonNegativeInt = 0  # seeds initialisation and every step's batch / noise

    def __post_init__(self):
        check_fields(self)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.label_dropout and not self.class_conditional:
            raise ConfigError("label_dropout needs a class-conditional model "
                              "(an unconditional one has no labels to drop)")


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """`tailforge train classifier`; copied into every checkpoint and the classifier's config."""

    dataset: str = "digits"  # dataset spec: train split (as shards) for training, test split for the log
    model: str = "tinycnn"  # any timm model name (tinycnn, tinycnn_wide, resnet18_cifar registered here)
    epochs: PositiveInt = 30  # epochs (resampled mode: epoch_samples samples each)
    batch_size: PositiveInt = 128  # images per optimizer step over all workers (each rank takes batch_size / workers)
    optimizer: Annotated[str, OneOf(OPTIMIZERS)] = "adamw"  # adamw | sgd (Nesterov momentum)
    lr: PositiveFloat = 3e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # decoupled (AdamW) or L2 (SGD) weight decay
    schedule: Annotated[str, OneOf(SCHEDULES)] = "cosine"  # cosine (to 0) | step (times gamma every step_epochs epochs)
    warmup: float = 0.15  # fraction of all steps spent in linear warmup from 0 to lr
    step_epochs: PositiveInt = 10  # step schedule: epochs between decays
    gamma: PositiveFloat = 0.1  # step schedule: decay factor
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    amp: bool = True  # float16 autocast + GradScaler when training on CUDA (no effect on the CPU)
    mix: tuple[MixSource, ...] = (MixSource(REAL, 1.0),)  # sources and their sampling weights
    resample: bool = True  # resampled epochs of epoch_samples samples; False: every sample once per epoch
    epoch_samples: NonNegativeInt = 0  # samples per epoch (resampled); 0: one pass over the real data in expectation
    shuffle_buffer: PositiveInt = 1000  # samples in each reader's shuffle buffer
    loader_workers: NonNegativeInt = 1  # DataLoader worker processes per rank (0: read in the training process)
    workers: PositiveInt = 1  # Ray Train workers (DDP ranks); 1 trains in this process
    follow: bool = False  # read synthetic shard sets while their generation job still writes them
    follow_timeout: PositiveFloat = 600.0  # follow: seconds to wait for a set's first shard
    diffaug: str = ""  # DiffAug diffusion-model folder ("" = no DiffAug)
    diffaug_actors: NonNegativeInt = 0  # DiffAug on this many AugmentActors (0 = in the training process)
    checkpoint_every: PositiveInt = 1  # epochs between checkpoints
    seed: NonNegativeInt = 0  # initialisation, data order and augmentation seed

    def __post_init__(self):
        check_fields(self)
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.batch_size % self.workers:
            raise ConfigError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers} "
                              "(each rank takes an equal share)")
        if not self.mix:
            raise ConfigError("mix names no source")
        if self.follow and not self.resample:
            raise ConfigError("follow mode needs resampled epochs (the followed sets grow during the run)")
        if self.follow and self.epoch_samples == 0 and all(s.name != REAL for s in self.mix):
            raise ConfigError("follow mode without real data needs epoch_samples (the followed sets' sizes are unknown)")
        if self.diffaug_actors and not self.diffaug:
            raise ConfigError("diffaug_actors needs diffaug (a diffusion-model folder)")


@dataclasses.dataclass(frozen=True)
class GuidanceTrainConfig:
    """`tailforge train guidance`; copied into guidance.json."""

    dataset: str = "digits"  # dataset spec: its training split is the real data
    # diffusion model folder whose baseline samples are the discriminator's synthetic class
    model: str = dataclasses.field(kw_only=True)
    # what the nets see while sampling: "x0" (x0_hat), "xt" (noisy x_t, timestep-aware) or "xt+x0"
    # (both: Sastry et al. 2023's denoise-augmented classifiers; needs a model trained with label dropout)
    input: Annotated[str, OneOf(GUIDANCE_INPUTS)] = "x0"
    classifier: str = "tinycnn"  # timm name of the embedding classifier (hardness, L_g1)
    discriminator: str = "tinycnn"  # timm name of the real-vs-synthetic discriminator (H', L_g2)
    epochs: PositiveInt = 30  # passes over each network's training data
    batch_size: PositiveInt = 128  # images per step
    lr: PositiveFloat = 3e-3  # AdamW peak learning rate (cosine decay)
    # class covariances: auto (Ledoit-Wolf where singular) | ledoit_wolf | none
    shrinkage: Annotated[str, OneOf(SHRINKAGE)] = "auto"
    levels: PositiveInt = 10  # "xt" and "xt+x0": noise levels (evenly spaced timesteps) with their own class Gaussians
    synthetic: SamplingConfig = SamplingConfig()  # sampler of the baseline samples (paper: 250 DDPM steps)
    synthetic_shards: str = ""  # optional: read the baseline samples from this shard set instead
    synthetic_seed: NonNegativeInt = 1_000_000  # job seed of those samples, away from the seeds generation jobs use
    holdout: float = 0.15  # fraction of real + synthetic images held out to measure the discriminator
    seed: NonNegativeInt = 0  # initialisation, data order, noise and the holdout split

    def __post_init__(self):
        check_fields(self)
        if not self.model:
            raise ConfigError("a diffusion model folder is needed (--model): its samples train the discriminator")
        if not 0 < self.holdout < 0.5:
            raise ConfigError(f"holdout must be in (0, 0.5), got {self.holdout}")
