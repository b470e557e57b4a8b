"""Cheaper U-Net evaluations, added by wrapping a loaded model: each switch is a pure function
``DiffusionModel -> DiffusionModel`` that leaves its argument untouched (the U-Net is copied), so
the eager model stays available beside the accelerated one (the benchmarks compare them, and
diffusers' pipelines keep their own eager U-Net).

* :func:`channels_last`: the U-Net's weights in NHWC memory format; convolutions then run in the
  layout oneDNN / cuDNN prefer, with the same arithmetic up to summation order.
* :func:`compiled`: ``torch.compile`` (inductor) of the U-Net's forward. Inductor fuses the
  element-wise work between convolutions (group norms, SiLU, the residual and time-embedding
  additions) into generated C++ / Triton kernels; the first call with a new input shape compiles
  (tens of seconds on a CPU), which the benchmarks report separately from the steady rate.
* :func:`accelerate`: the switches of an :class:`AccelerationConfig` applied in turn.

Threads (``torch.set_num_threads``) are a process setting, not a model property; the config
carries the count so that one object describes a measured setting, and :func:`apply_threads`
sets it.

Which work they apply to: every sampler, guided sampling (the guided step calls the same
denoiser; the guidance nets' backward passes are not compiled here), DiffAug (its denoiser call is
a U-Net forward) and reconstruction go through ``model.denoiser``, so all of them get the
accelerated U-Net. Training builds its own U-Net (train/diffusion.py) and does not pass through
these wrappers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

from tailforge.gen.core.checks import PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.denoiser import UNetEpsModel
from tailforge.gen.models.diffusion import DiffusionModel


@dataclasses.dataclass(frozen=True)
class AccelerationConfig:
    """How a diffusion model's U-Net is evaluated (gen.models.accelerate)."""

    channels_last: bool = False  # U-Net weights in NHWC memory format (same results up to summation order)
    compile: bool = False  # torch.compile (inductor) of the U-Net; the first call of each batch shape compiles
    threads: PositiveInt | None = None  # torch.set_num_threads for the process (None: leave torch's default)

    def __post_init__(self):
        check_fields(self)

    def label(self) -> str:
        """A short name of the setting for tables: "eager", "channels_last+compile", "threads=1", ..."""
        parts = [name for name in ("channels_last", "compile") if getattr(self, name)]
        if self.threads is not None:
            parts.append(f"threads={self.threads}")
        return "+".join(parts) or "eager"


def _unet_model(model: DiffusionModel) -> UNetEpsModel:
    eps_model = model.denoiser.eps_model
    if not isinstance(eps_model, UNetEpsModel):
        raise ConfigError(f"{model.path}: only a U-Net model can be accelerated, got {type(eps_model).__name__}")
    return eps_model


def with_unet(model: DiffusionModel, transform: Callable[[nn.Module], nn.Module]) -> DiffusionModel:
    """A copy of `model` whose U-Net is ``transform(its own copy of the U-Net)``; the schedule,
    metadata and hash are the original's (the weights are the same)."""
    _unet_model(model)
    denoiser = copy.deepcopy(model.denoiser)
    denoiser.eps_model.unet = transform(denoiser.eps_model.unet)
    return dataclasses.replace(model, denoiser=denoiser)


def channels_last(model: DiffusionModel) -> DiffusionModel:
    """`model` with its U-Net's weights in channels_last (NHWC) memory format."""
    return with_unet(model, lambda unet: unet.to(memory_format=torch.channels_last))


def compiled(model: DiffusionModel, mode: str | None = None) -> DiffusionModel:
    """`model` with its U-Net compiled by torch.compile (inductor backend). ``mode`` is
    torch.compile's (None: its default; "max-autotune" tries more kernels on a GPU)."""

    def compile_unet(unet: nn.Module) -> nn.Module:
        return torch.compile(unet, backend="inductor", mode=mode)

    return with_unet(model, compile_unet)


def apply_threads(config: AccelerationConfig) -> None:
    """Set torch's intra-op thread count if the config names one."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)


def accelerate(model: DiffusionModel, config: AccelerationConfig) -> DiffusionModel:
    """`model` with the config's switches applied (channels_last before compile, so the compiled
    graph sees NHWC weights); the thread count is set for the process."""
    apply_threads(config)
    if config.channels_last:
        model = channels_last(model)
    if config.compile:
        model = compiled(model)
    return model
