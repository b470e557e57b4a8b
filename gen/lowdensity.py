"""`tailforge gen lowdensity`: alpha/beta-guided sampling from low-density regions into shards
(seed 000, Sehwag et al. 2022, Eq. 7 / Algorithm 1; the guided step lives in gen.guidance).

Modelled on gen.baseline: the same per-sample noise, grid and sampler, with the clamped denoiser
wrapped by :class:`~tailforge.gen.guidance.LowDensityGuidance`, so sample i of a low-density job
and sample i of a baseline job with the same seed start from the same x_T and see the same noise;
the guidance terms are the only difference (the paper's Fig. 5/6 protocol).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch

from .baseline import SamplingConfig, balanced_labels, generate_batch
from .checkpoint import DiffusionModel, load_diffusion_model
from .datasets import uint8_to_float
from .errors import ConfigError
from .guidance import GuidanceConfig, GuidanceModels, guided_wrapper, load_guidance
from .shards import ShardSpec, encode_sample, sample_key


@dataclasses.dataclass(frozen=True)
class LowDensityConfig:
    """`tailforge gen lowdensity`: guided sampling into shards."""

    model: str  # diffusion model folder
    guidance: str  # guidance folder (tailforge train guidance): classifier, discriminator, class Gaussians
    num: int  # number of samples
    sampling: SamplingConfig = SamplingConfig()  # sampler (ddpm or ddim) and steps; paper: 250 DDPM steps
    guide: GuidanceConfig = GuidanceConfig()  # alpha, beta, tau, loss variant
    seed: int = 0  # job seed: sample i's noise comes from (seed, i), as in a baseline job
    job: str = "lowdensity"  # name used in shard and sample keys
    shard_size: int = 1000  # samples per shard
    batch_size: int = 128  # samples per denoiser batch (does not change the samples' noise)


def generate_guided_batch(model: DiffusionModel, guidance: GuidanceModels, sampling: SamplingConfig,
                          guide: GuidanceConfig, seed: int, indices: list[int], labels: torch.Tensor) -> torch.Tensor:
    """Guided samples for global `indices` (uint8 NCHW): gen.baseline.generate_batch with the
    denoiser wrapped by Algorithm 1's guidance."""
    wrap = guided_wrapper(guidance, guide, sampling.sampler, sampling.sampler_settings())
    return generate_batch(model, sampling, seed, indices, labels.to(model.device), wrap=wrap)


def guidance_meta(guidance: GuidanceModels, guide: GuidanceConfig, path: str) -> dict[str, Any]:
    """What every low-density sample records about its guidance (json fields)."""
    return {"alpha": guide.alpha, "beta": guide.beta, "tau": guide.tau, "guidance_loss": guide.loss,
            "guidance_input": guidance.input, "guidance": path, "guidance_hash": guidance.info.get("guidance_hash"),
            "guidance_classifier_sha256": guidance.info.get("classifier_sha256")}


class LowDensitySource:
    """Produces a low-density shard's samples; held once per actor with both models loaded."""

    def __init__(self, config: LowDensityConfig, device: str | None = None):
        config.guide.validate()
        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_diffusion_model(config.model, self.device)
        if self.model.meta.num_classes is None:
            raise ConfigError(f"{config.model} is unconditional; low-density guidance needs a class-conditional model")
        self.guidance = load_guidance(config.guidance, self.device)
        self.meta = guidance_meta(self.guidance, config.guide, config.guidance)
        self.model_evals = 0

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]:
        cfg = self.config
        for first in range(spec.start, spec.start + spec.count, cfg.batch_size):
            indices = list(range(first, min(first + cfg.batch_size, spec.start + spec.count)))
            labels = balanced_labels(indices, self.model.meta.num_classes)
            images = generate_guided_batch(self.model, self.guidance, cfg.sampling, cfg.guide, cfg.seed, indices, labels)
            self.model_evals += len(indices) * cfg.sampling.evals_per_sample()
            # Hardness (Eq. 3) of the image as stored (uint8), under the guidance classifier.
            scores = self.guidance.sample_hardness(uint8_to_float(images).to(self.device), labels.to(self.device))
            for row, index in enumerate(indices):
                label = int(labels[row])
                yield encode_sample(sample_key(cfg.job, index), images[row].permute(1, 2, 0).numpy(), label, {
                    "job": cfg.job, "kind": "lowdensity", "index": index, "label": label, "seed": cfg.seed,
                    "model_hash": self.model.model_hash, **dataclasses.asdict(cfg.sampling), **self.meta,
                    "hardness": round(float(scores[row]), 5),
                })
