"""Samplers: pure functions with one signature.

    sample_x(denoiser, x, sigmas, *, labels=None, rng=None, callback=None) -> x0

``x`` is the starting point in sigma-space (``sigmas[0] * noise`` for generation, a diffused real
image for reconstruction), ``sigmas`` a descending grid ending in 0, ``rng`` a
:class:`~tailforge.gen.core.noise.PerSampleNoise` (or a ``torch.Generator``, or None for torch's global
generator), ``callback`` is called after every step with a dict (i, x, sigma, sigma_next,
denoised). Sampler-specific settings (DDIM's eta, DDPM's variance) are keyword arguments with the
papers' defaults; :func:`get_sampler` binds them so callers see the common signature.

Every sampler is registered once as a SamplerSpec in SAMPLERS, in gen/diffusion/config.py (which
imports no torch, so the command line can list the names): its grid, its denoiser calls per step,
the settings it takes and, for samplers whose step is a pure function of tensors affine in the
denoised estimate, the :class:`StepRule` that low-density guidance, Sehwag et al. 2022 Algorithm 1,
wraps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
from torch import Tensor

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.images import float_to_uint8
from tailforge.gen.core.noise import PerSampleNoise
from tailforge.gen.diffusion.config import SamplingConfig, sampler_spec
from tailforge.gen.diffusion.denoiser import CheckFinite, ClampDenoised, Denoiser
from tailforge.gen.diffusion.schedules import karras_sigmas, schedule_sigmas
from tailforge.gen.models.diffusion import DiffusionModel

Rng = PerSampleNoise | torch.Generator | None
Callback = Callable[[dict[str, Any]], None] | None

DDPM_VARIANCES = ("small", "large")


def noise_like(x: Tensor, rng: Rng) -> Tensor:
    if isinstance(rng, PerSampleNoise):
        return rng.randn_like(x)
    return torch.randn(x.shape, generator=rng, dtype=x.dtype).to(x.device) if rng is not None else torch.randn_like(x)


def ddpm_posterior_std(sigma: Tensor, sigma_next: Tensor, variance: str = "small") -> Tensor:
    """Std of the DDPM reverse transition p(x_{t-1} | x_t) in sigma-space (Sigma_theta of Sehwag et al. 2022 Eq. 2).

    Ho et al. 2020, Sec. 3.2 fix the variance to beta_tilde_t (posterior, "small") or beta_t
    ("large"). With alpha_bar = 1 / (1 + sigma^2) and a step from sigma to sigma_next:
      small: beta_tilde / alpha_bar_next = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
      large: beta / alpha_bar_next = (sigma^2 - sigma_next^2) (1 + sigma_next^2) / (1 + sigma^2)
    (dividing by alpha_bar_next converts the variance of x_vp to the variance of x = x_vp / sqrt(ab)).
    """
    if variance == "small":
        var = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    elif variance == "large":
        var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
    else:
        raise ConfigError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    return var.clamp_min(0).sqrt()


def ddpm_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor,
              variance: str = "small") -> Tensor:
    """One DDPM ancestral step (Ho et al. 2020, Eq. 6-7 / Algorithm 2) in sigma-space.

    The posterior mean sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
    divided by sqrt(ab_{t-1}), simplifies to x0_hat + (sigma_next^2 / sigma) eps_hat with
    eps_hat = (x - x0_hat) / sigma; the noise term is ddpm_posterior_std * z.
    """
    eps = (x - denoised) / sigma
    return denoised + (sigma_next**2 / sigma) * eps + ddpm_posterior_std(sigma, sigma_next, variance) * noise


def ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor | None,
              eta: float = 0.0) -> Tensor:
    """One DDIM step (Song et al. 2021, Eq. 12) in sigma-space.

    x_{t-1} = x0_hat + sqrt(sigma_next^2 - s^2) eps_hat + s z, with s = eta * (the DDPM posterior
    std); eta = 0 is deterministic DDIM, eta = 1 equals the DDPM "small" variance step.
    """
    eps = (x - denoised) / sigma
    s = eta * ddpm_posterior_std(sigma, sigma_next, "small")
    out = denoised + (sigma_next**2 - s**2).clamp_min(0).sqrt() * eps
    return out if noise is None else out + s * noise


def _report(callback: Callback, i: int, x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def _sigma_batch(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0])


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                rng: Rng = None, callback: Callback = None, variance: str = "small") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): the baseline sampler of Sehwag et al. 2022."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        # No noise on the final step into sigma = 0 (Algorithm 2: z = 0 when t = 1); skip the draw so
        # the generators are not advanced for nothing.
        noise = noise_like(x, rng) if sigma_next > 0 else torch.zeros_like(x)
        x = ddpm_step(x, denoised, sigma, sigma_next, noise, variance)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                rng: Rng = None, callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12); eta = 0 is the deterministic ODE-like sampler."""
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        noise = noise_like(x, rng) if eta > 0 and sigma_next > 0 else None
        x = ddim_step(x, denoised, sigma, sigma_next, noise, eta)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                 rng: Rng = None, callback: Callback = None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, Eq. 4 with sigma(t) = t; Algorithm 1 without the Heun correction)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, labels: Tensor | None = None,
                rng: Rng = None, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the average
    of the slopes at both ends, except on the last step into sigma = 0 where the slope is undefined."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), labels)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next > 0:
            slope_next = (x_euler - denoiser(x_euler, _sigma_batch(sigma_next, x), labels)) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        else:
            x = x_euler
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@dataclasses.dataclass(frozen=True)
class StepRule:
    """One sampler step as a pure function of tensors, affine in the denoised estimate, with the
    std of the step's ancestral noise: what low-density guidance (Sehwag et al. 2022, Algorithm 1,
    gen.methods.lowdensity) needs to add its update to the sampler's own step."""

    step: Callable[..., Tensor]  # (x, denoised, sigma, sigma_next, noise) -> x_next, settings bound
    sigma_theta: Callable[[Tensor, Tensor], Tensor]  # (sigma, sigma_next) -> the step's Sigma_theta


def ddpm_step_rule(settings: dict[str, Any]) -> StepRule:
    variance = settings.get("variance", "small")
    return StepRule(functools.partial(ddpm_step, variance=variance),
                    functools.partial(ddpm_posterior_std, variance=variance))


def ddim_step_rule(settings: dict[str, Any]) -> StepRule:
    # Sigma_theta is the DDPM posterior std of the same step whatever eta: at eta = 0 DDIM injects
    # no noise, and scaling guidance by that would switch it off (gen.methods.lowdensity docstring).
    return StepRule(functools.partial(ddim_step, eta=settings.get("eta", 0.0)),
                    functools.partial(ddpm_posterior_std, variance="small"))


def get_sampler(name: str, **settings: Any) -> Callable[..., Tensor]:
    """The sampler `name` with its settings bound (e.g. ``get_sampler("ddim", eta=0.0)``)."""
    fn = sampler_spec(name).sample_fn()
    return functools.partial(fn, **settings) if settings else fn


def sampler_sigmas(name: str, denoiser: Denoiser, steps: int, *, t_max: int | None = None) -> Tensor:
    """The sigma grid sampler `name` runs on (its spec's `grid`): the model's own timesteps
    (trailing spacing) or the Karras grid. ``t_max`` truncates the chain (reconstruction)."""
    train_sigmas = denoiser.train_sigmas
    if sampler_spec(name).grid == "schedule":
        return schedule_sigmas(train_sigmas.cpu(), steps, t_max=t_max)
    sigma_max = denoiser.sigma_max if t_max is None else float(train_sigmas[t_max])
    return karras_sigmas(denoiser.sigma_min, sigma_max, steps)


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
    such as low-density guidance (gen.methods.lowdensity) that need the sigma grid; everything else (noise,
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
