"""The sampling settings and the sampler registry, importable without torch.

Every sampler is registered once as a :class:`SamplerSpec` in :data:`SAMPLERS` (its grid, its
denoiser calls per step, the settings it takes and, for samplers whose step is a pure function of
tensors affine in the denoised estimate, the :class:`~tailforge.gen.diffusion.samplers.StepRule`
that low-density guidance, Sehwag et al. 2022 Algorithm 1, wraps). An entry names its functions as
``"module:function"`` text, imported on first use (gen/core/refs.py), so ``--sampler``'s choices and
SamplingConfig's check need no torch; the functions themselves live in gen/diffusion/samplers.py
(and solvers.py).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable

from tailforge.gen.core.checks import OneOf, PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.refs import resolve

#: Schedule names accepted by the CLI, mapped to diffusers' names. "cosine" is Nichol & Dhariwal
#: (2021) Eq. 17, which diffusers calls "squaredcos_cap_v2".
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: everything callers need to know about it, so none branches on its name."""

    name: str  # the --sampler value
    sample: str  # "module:function" of the sampling function (the common signature of gen/diffusion/samplers.py)
    grid: str  # sigma grid it runs on: "schedule" = the model's own timesteps, "karras" = Karras et al. Eq. 5
    evals_per_step: int  # denoiser calls per step; the last step into sigma = 0 makes only the first
    settings: tuple[str, ...] = ()  # SamplingConfig fields passed to `sample` as keyword arguments
    # "module:function" taking the settings dict to the guided StepRule; only samplers whose step is a pure
    # function affine in the denoised estimate (Algorithm 1 is an ancestral step) have one, the others ""
    step_rule: str = ""

    def sample_fn(self) -> Callable[..., Any]:
        """The sampling function (imports its module, and torch, on first use)."""
        return resolve(self.sample)

    def step_rule_fn(self) -> Callable[[dict[str, Any]], Any] | None:
        """settings -> StepRule, or None for a sampler low-density guidance cannot wrap."""
        return resolve(self.step_rule) if self.step_rule else None

    def evals(self, steps: int) -> int:
        """Denoiser calls of a `steps`-step chain (Heun: 2 per step but 1 on the last)."""
        return self.evals_per_step * (steps - 1) + 1


_SAMPLERS = "tailforge.gen.diffusion.samplers"
_SOLVERS = "tailforge.gen.diffusion.solvers"  # few-step multistep ODE solvers

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddpm", f"{_SAMPLERS}:sample_ddpm", "schedule", 1, step_rule=f"{_SAMPLERS}:ddpm_step_rule"),
    SamplerSpec("ddim", f"{_SAMPLERS}:sample_ddim", "schedule", 1, settings=("eta",),
                step_rule=f"{_SAMPLERS}:ddim_step_rule"),
    SamplerSpec("euler", f"{_SAMPLERS}:sample_euler", "karras", 1),
    SamplerSpec("heun", f"{_SAMPLERS}:sample_heun", "karras", 2),
    SamplerSpec("dpmpp-2m", f"{_SOLVERS}:sample_dpmpp_2m", "schedule", 1),
    SamplerSpec("dpmpp-2m-karras", f"{_SOLVERS}:sample_dpmpp_2m", "karras", 1),
    SamplerSpec("unipc", f"{_SOLVERS}:sample_unipc", "schedule", 1),
    SamplerSpec("unipc-karras", f"{_SOLVERS}:sample_unipc", "karras", 1),
)}


def sampler_spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def guided_sampler_names() -> str:
    """The samplers whose spec declares a guided step rule, for messages ("ddpm or ddim")."""
    return " or ".join(name for name, spec in SAMPLERS.items() if spec.step_rule)


def guided_sampler_spec(name: str) -> SamplerSpec:
    """The spec of a sampler low-density guidance can wrap (one with a step rule), else a ConfigError
    naming those that can: checked when a job's config is built, before any model loads."""
    spec = sampler_spec(name)
    if not spec.step_rule:
        raise ConfigError(f"low-density guidance runs with the {guided_sampler_names()} sampler (Sehwag et al. 2022's Algorithm 1 "
                          f"is an ancestral step), not {name!r}")
    return spec


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled; copied into every sample's json."""

    # ddpm (ancestral), ddim (eta), euler / heun (Karras ODE), dpmpp-2m / unipc (few-step multistep ODE solvers,
    # Lu et al. 2022 / Zhao et al. 2023; -karras: on the Karras grid)
    sampler: Annotated[str, OneOf(SAMPLERS)] = "ddpm"
    steps: PositiveInt = 250  # denoiser steps (the Sehwag et al. 2022 baseline samples with 250 DDPM steps)
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 equals DDPM
    clip_denoised: bool = True  # clamp x0_hat to [-1, 1] at every step (DDPM's clip trick)

    def __post_init__(self):
        check_fields(self)

    def sampler_settings(self) -> dict[str, Any]:
        """The fields of this config the sampler takes (its spec's `settings`), by name."""
        return {name: getattr(self, name) for name in sampler_spec(self.sampler).settings}

    def evals_per_sample(self) -> int:
        """Denoiser calls per sample (the spec's count for `steps` steps)."""
        return sampler_spec(self.sampler).evals(self.steps)
