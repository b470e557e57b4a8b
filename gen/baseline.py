"""Baseline generation: plain class-conditional sampling (the seeds' reference sampler is DDPM)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch

from .checkpoint import DiffusionModel, load_diffusion_model
from .datasets import float_to_uint8
from .denoiser import CheckFinite, ClampDenoised, Denoiser
from .noise import PerSampleNoise
from .samplers import get_sampler, sampler_sigmas
from .shards import ShardSpec, encode_sample, sample_key


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled; copied into every sample's json."""

    sampler: str = "ddpm"  # ddpm | ddim | euler | heun
    steps: int = 250  # denoiser steps (the seed 000 baseline samples with 250 DDPM steps)
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 equals DDPM
    clip_denoised: bool = True  # clamp x0_hat to [-1, 1] at every step (DDPM's clip trick)

    def sampler_settings(self) -> dict[str, Any]:
        return {"eta": self.eta} if self.sampler == "ddim" else {}

    def evals_per_sample(self) -> int:
        """Denoiser calls per sample: Heun pays twice per step except on the last one."""
        return 2 * self.steps - 1 if self.sampler == "heun" else self.steps


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """`tailforge gen baseline`: plain sampling into shards."""

    model: str  # diffusion model folder
    num: int  # number of samples
    sampling: SamplingConfig = SamplingConfig()  # sampler and steps
    seed: int = 0  # job seed: sample i's noise comes from (seed, i)
    job: str = "baseline"  # name used in shard and sample keys
    shard_size: int = 1000  # samples per shard
    batch_size: int = 128  # samples per denoiser batch (does not change the samples' noise)


def balanced_labels(indices: range | list[int], num_classes: int | None) -> torch.Tensor | None:
    """Class-balanced labels: sample i gets class i mod num_classes (None for unconditional models)."""
    if num_classes is None:
        return None
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def generate_batch(model: DiffusionModel, sampling: SamplingConfig, seed: int, indices: list[int],
                   labels: torch.Tensor | None,
                   wrap: Callable[[Denoiser, torch.Tensor], Denoiser] | None = None) -> torch.Tensor:
    """Sample images for global `indices` (each with its own noise stream); returns uint8 NCHW.

    ``wrap(denoiser, sigmas)``, if given, wraps the (clamped) denoiser before sampling: features
    such as low-density guidance (gen.guidance) that need the sigma grid; everything else (noise,
    grid, sampler) is the baseline's, so a wrapper that changes nothing gives the same bytes.
    """
    rng = PerSampleNoise(seed, indices)
    sigmas = sampler_sigmas(sampling.sampler, model.denoiser, sampling.steps)
    # The NaN/Inf check wraps the model innermost: ClampDenoised would turn Inf into +-1 and hide it.
    denoiser = CheckFinite(model.denoiser, sigmas, indices)
    denoiser = ClampDenoised(denoiser) if sampling.clip_denoised else denoiser
    if wrap is not None:
        denoiser = wrap(denoiser, sigmas)
    shape = (model.meta.channels, model.meta.image_size, model.meta.image_size)
    x = sigmas[0] * rng.randn(shape, device=model.device)
    sampler = get_sampler(sampling.sampler, **sampling.sampler_settings())
    out = sampler(denoiser, x, sigmas, labels=None if labels is None else labels.to(model.device), rng=rng)
    return float_to_uint8(out).cpu()


class BaselineSource:
    """Produces a baseline shard's samples; held once per actor with its model loaded."""

    def __init__(self, config: BaselineConfig, device: str | None = None):
        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_diffusion_model(config.model, self.device)
        self.model_evals = 0

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]:
        cfg, meta = self.config, self.model.meta
        for first in range(spec.start, spec.start + spec.count, cfg.batch_size):
            indices = list(range(first, min(first + cfg.batch_size, spec.start + spec.count)))
            labels = balanced_labels(indices, meta.num_classes)
            images = generate_batch(self.model, cfg.sampling, cfg.seed, indices, labels)
            self.model_evals += len(indices) * cfg.sampling.evals_per_sample()
            for row, index in enumerate(indices):
                label = int(labels[row]) if labels is not None else 0
                yield encode_sample(sample_key(cfg.job, index), images[row].permute(1, 2, 0).numpy(), label, {
                    "job": cfg.job, "kind": "baseline", "index": index, "label": label, "seed": cfg.seed,
                    "model_hash": self.model.model_hash, **dataclasses.asdict(cfg.sampling),
                })
