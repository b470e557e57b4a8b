"""Real-sample reconstruction (seed 001, Yamaguchi & Fukuda, Sec. 3.2 and Algorithm 1).

Each real image x0 is diffused forward to step t_re and the reverse process is run from t_re back
to 0. The result lies between the real image (t_re = 0) and a fully synthetic sample of the
image's class (t_re = T). Reconstruction is the existing samplers on a truncated sigma grid
(:func:`~tailforge.gen.samplers.sampler_sigmas` with ``t_max``), started from the diffused real
image instead of pure noise, so every sampler (DDPM ancestral, the paper's Eq. 2, by default) and
every Denoiser wrapper works unchanged.

Time convention, shared with DiffAug (:mod:`tailforge.gen.diffaug`): t counts forward-diffusion
steps as in Ho et al. 2020, so t = 0 is the clean image and t = T the last trained step; the
model's timestep index (diffusers' convention, ``train_sigmas[i]``) is t - 1. ``t_re`` on the
command line is a fraction of T: 0.3 with T = 1000 is t = 300.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
from torch import Tensor

from .baseline import SamplingConfig
from .checkpoint import load_diffusion_model
from .datasets import float_to_uint8, load_dataset, uint8_to_float
from .denoiser import ClampDenoised, Denoiser
from .errors import ConfigError
from .noise import PerSampleNoise
from .samplers import get_sampler, noise_like, sampler_sigmas
from .shards import ShardSpec, encode_sample, sample_key


def sigma_at_step(train_sigmas: Tensor, t: Tensor) -> Tensor:
    """sigma of x_t = x0 + sigma * eps after t forward steps (t an int tensor in [0, T]).

    q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) (Ho et al. 2020, Eq. 4) is x = x0 + sigma_t eps in
    sigma-space with sigma_t = train_sigmas[t - 1]; t = 0 has sigma 0 (no noise: the image itself).
    """
    t = torch.as_tensor(t, dtype=torch.long)
    num_steps = len(train_sigmas)
    if bool(((t < 0) | (t > num_steps)).any()):
        raise ConfigError(f"diffusion steps must be in [0, {num_steps}], got {t.tolist()}")
    sigmas = torch.cat([train_sigmas.new_zeros(1), train_sigmas])
    return sigmas[t.to(train_sigmas.device)]


def t_re_steps(t_re: float, num_train_timesteps: int) -> int:
    """The fraction t_re of T as a whole number of forward steps (t_re = 1 is t = T)."""
    if not 0.0 <= t_re <= 1.0:
        raise ConfigError(f"t_re must be a fraction of T in [0, 1], got {t_re}")
    return round(t_re * num_train_timesteps)


def chain_steps(full_steps: int, t_re: float, t: int) -> int:
    """Denoiser steps of a chain from t back to 0 when `full_steps` is the count of the full chain:
    round(full_steps * t_re), at least 1 and at most t, so every t_re walks with the same step size
    (the `strength` convention of SDEdit / diffusers' img2img)."""
    return min(t, max(1, round(full_steps * t_re)))


@torch.no_grad()
def reconstruct(denoiser: Denoiser, x0: Tensor, t: int, *, sampler: str = "ddpm", steps: int = 250,
                labels: Tensor | None = None, rng: PerSampleNoise | torch.Generator | None = None,
                **sampler_settings: Any) -> Tensor:
    """Algorithm 1 of seed 001: diffuse x0 ([-1, 1] NCHW) forward t steps, reverse back to 0.

    Lines 1-5 (t forward steps of sqrt(a_t) x_{t-1} + sqrt(1 - a_t) eps) are drawn in one go from
    their closed form q(x_t | x0), the same distribution; lines 6-9 are `sampler` (DDPM ancestral,
    Eq. 2, by default) on `steps` steps of the grid truncated at t. t = 0 returns x0 itself.
    The first draw of each sample's generator is the forward noise, the rest feed the sampler.
    """
    if t == 0:
        return x0.clone()
    sigmas = sampler_sigmas(sampler, denoiser, steps, t_max=t - 1)
    x = x0 + sigmas[0].to(x0) * noise_like(x0, rng)
    return get_sampler(sampler, **sampler_settings)(denoiser, x, sigmas, labels=labels, rng=rng)


@dataclasses.dataclass(frozen=True)
class ReconstructConfig:
    """`tailforge gen reconstruct`, one shard set per t_re; copied into every sample's json."""

    model: str  # diffusion model folder
    dataset: str  # dataset spec whose images are reconstructed (labels are kept)
    t_re: float  # reverse step as a fraction of T: 0 = the real images, 1 = full generation
    split: str = "train"  # which split of the dataset is reconstructed
    sampling: SamplingConfig = SamplingConfig()  # sampler; `steps` is the full chain's count (t_re = 1)
    seed: int = 0  # job seed: sample i's forward and reverse noise come from (seed, i)
    job: str = "reconstruct"  # name used in shard and sample keys
    shard_size: int = 1000  # samples per shard
    batch_size: int = 128  # images per denoiser batch (does not change the samples' noise)


class ReconstructSource:
    """Produces a reconstruction shard's samples; held once per actor with its model and the
    source images loaded. Sample i is the reconstruction of image i of the split."""

    def __init__(self, config: ReconstructConfig, device: str | None = None):
        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_diffusion_model(config.model, self.device)
        self.data = load_dataset(config.dataset, config.split)
        meta = self.model.meta
        if (self.data.info.channels, self.data.info.image_size) != (meta.channels, meta.image_size):
            raise ConfigError(
                f"dataset {config.dataset!r} has {self.data.info.channels}x{self.data.info.image_size}px images but "
                f"the model in {config.model} makes {meta.channels}x{meta.image_size}px images")
        self.t = t_re_steps(config.t_re, len(self.model.denoiser.train_sigmas))
        # the sampler settings of this t_re's chain (the full chain's steps scaled by t_re)
        self.chain = dataclasses.replace(config.sampling, steps=chain_steps(config.sampling.steps, config.t_re, self.t)
                                         ) if self.t else None
        self.sigma = float(sigma_at_step(self.model.denoiser.train_sigmas, torch.tensor(self.t)))
        self.denoiser = ClampDenoised(self.model.denoiser) if config.sampling.clip_denoised else self.model.denoiser
        self.model_evals = 0

    def reconstruct_batch(self, indices: list[int]) -> Tensor:
        """Reconstructions of source images `indices` as uint8 NCHW (the sources themselves at t = 0)."""
        x0 = self.data.images[indices]
        if self.chain is None:
            return x0
        labels = self.data.labels[indices].to(self.device) if self.model.meta.num_classes is not None else None
        out = reconstruct(self.denoiser, uint8_to_float(x0).to(self.device), self.t, sampler=self.chain.sampler,
                          steps=self.chain.steps, labels=labels, rng=PerSampleNoise(self.config.seed, indices),
                          **self.chain.sampler_settings())
        self.model_evals += len(indices) * self.chain.evals_per_sample()
        return float_to_uint8(out).cpu()

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]:
        cfg = self.config
        for first in range(spec.start, spec.start + spec.count, cfg.batch_size):
            indices = list(range(first, min(first + cfg.batch_size, spec.start + spec.count)))
            images = self.reconstruct_batch(indices)
            for row, index in enumerate(indices):
                label = int(self.data.labels[index])
                yield encode_sample(sample_key(cfg.job, index), images[row].permute(1, 2, 0).numpy(), label, {
                    "job": cfg.job, "kind": "reconstruct", "index": index, "label": label, "seed": cfg.seed,
                    "model_hash": self.model.model_hash, "source_dataset": cfg.dataset, "source_split": cfg.split,
                    "source_key": self.data.keys[index], "t_re": cfg.t_re, "t": self.t, "sigma": self.sigma,
                    **dataclasses.asdict(cfg.sampling), "chain_steps": self.chain.steps if self.chain else 0,
                })


def shard_set_name(t_re: float) -> str:
    """The folder and job-name suffix of the shard set for `t_re`: t_re_0p3, t_re_1, ... (no '.':
    webdataset splits a tar member's key from its extension at the first dot)."""
    return "t_re_" + f"{t_re:.6f}".rstrip("0").rstrip(".").replace(".", "p")
