"""Real-sample reconstruction (Yamaguchi & Fukuda 2023, Sec. 3.2 and Algorithm 1).

Each real image x0 is diffused forward to step t_re and the reverse process is run from t_re back
to 0. The result lies between the real image (t_re = 0) and a fully synthetic sample of the
image's class (t_re = T). Reconstruction is the existing samplers on a truncated sigma grid
(:func:`~tailforge.gen.diffusion.samplers.sampler_sigmas` with ``t_max``), started from the diffused real
image instead of pure noise, so every sampler (DDPM ancestral, the paper's Eq. 2, by default) and
every Denoiser wrapper works unchanged.

Time convention, shared with DiffAug (:mod:`tailforge.gen.methods.diffaug`): t counts forward-diffusion
steps as in Ho et al. 2020, so t = 0 is the clean image and t = T the last trained step; the
model's timestep index (diffusers' convention, ``train_sigmas[i]``) is t - 1. ``t_re`` on the
command line is a fraction of T: 0.3 with T = 1000 is t = 300.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.noise import PerSampleNoise
from tailforge.gen.diffusion.denoiser import Denoiser
from tailforge.gen.diffusion.samplers import get_sampler, noise_like, sampler_sigmas


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
    """Algorithm 1 of Yamaguchi & Fukuda 2023: diffuse x0 ([-1, 1] NCHW) forward t steps, reverse back to 0.

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
