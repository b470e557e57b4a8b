"""Noise schedules and sigma grids.

Everything downstream works in sigma-space (variance-exploding form, as EDM / k-diffusion):
x = x0 + sigma * eps. A DDPM schedule with cumulative products alpha_bar_t maps to it by
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) and x = x_vp / sqrt(alpha_bar_t)
(Karras et al. 2022, Table 1, "VP" column).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.config import BETA_SCHEDULES

#: Timestep spacings for truncated grids. "trailing" starts at t = T - 1 (Lin et al. 2024, Table 2)
#: so the first step sees pure noise; "leading" is DDPM/diffusers' historical default.
SPACINGS = ("trailing", "leading", "linspace")


def alphas_cumprod(schedule: str = "linear", num_train_timesteps: int = 1000) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 of a DDPM schedule (Ho et al. 2020, Sec. 4: linear betas
    1e-4..0.02 over T = 1000), computed by diffusers so our numbers equal the reference ones."""
    if schedule not in BETA_SCHEDULES:
        raise ConfigError(f"unknown beta schedule {schedule!r}; choose one of {sorted(BETA_SCHEDULES)}")
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[schedule])
    return scheduler.alphas_cumprod.clone().float()


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def spaced_timesteps(num_train_timesteps: int, steps: int, *, t_max: int | None = None,
                     spacing: str = "trailing") -> torch.Tensor:
    """`steps` integer timesteps in [0, t_max], descending, spaced like diffusers' schedulers.

    With t_max = T - 1 these equal diffusers' ``set_timesteps(steps)`` for the same spacing, which
    is what lets our DDPM step be checked against ``DDPMScheduler.step``. A smaller t_max gives the
    truncated grid that reconstruction (Yamaguchi & Fukuda 2023, Algorithm 1) runs from t_re back to 0.
    """
    t_max = num_train_timesteps - 1 if t_max is None else int(t_max)
    if not 0 <= t_max < num_train_timesteps:
        raise ConfigError(f"t_max={t_max} outside [0, {num_train_timesteps - 1}]")
    span = t_max + 1
    if not 1 <= steps <= span:
        raise ConfigError(f"steps={steps} must be in [1, {span}] for t_max={t_max}")
    if spacing == "trailing":
        ts = torch.arange(span, 0, -span / steps, dtype=torch.float64).round() - 1
    elif spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (span // steps)).round().flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, t_max, steps, dtype=torch.float64).round().flip(0)
    else:
        raise ConfigError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return ts.long()


def schedule_sigmas(train_sigmas: torch.Tensor, steps: int, *, t_max: int | None = None,
                    spacing: str = "trailing") -> torch.Tensor:
    """Descending sigma grid on the model's own discrete timesteps, ending in 0 (DDPM / DDIM)."""
    ts = spaced_timesteps(len(train_sigmas), steps, t_max=t_max, spacing=spacing)
    return torch.cat([train_sigmas[ts], train_sigmas.new_zeros(1)])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
    then sigma_N = 0. The default grid of the Euler and Heun samplers."""
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


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
