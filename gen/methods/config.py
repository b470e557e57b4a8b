"""Low-density guidance settings (Sehwag et al. 2022) and their names, importable without torch."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from tailforge.gen.core.checks import OneOf, check_fields
from tailforge.gen.core.errors import ConfigError

#: class covariances: auto (Ledoit-Wolf where the sample covariance is singular) | ledoit_wolf | none
SHRINKAGE = ("auto", "ledoit_wolf", "none")
#: what the guidance networks see at each step: the noisy x_t (timestep-aware nets), x0_hat, or both
#: (Sastry et al. 2023's denoise-augmented classifiers: x_t and the model's unconditional x0_hat(x_t))
GUIDANCE_INPUTS = ("xt", "x0", "xt+x0")
#: Algorithm 1's Sigma_theta as a scale: the posterior std, or its variance (see lowdensity.guidance_scale)
GUIDANCE_SCALES = ("std", "variance")
#: "hardness": Eq. 4 / Eq. 6 on class Gaussians of embeddings; "softmax": the probability variant
GUIDANCE_LOSSES = ("hardness", "softmax")


def guidance_in_chans(input: str, channels: int) -> int:
    """Input channels of a guidance net for `channels`-channel images: the image ("x0"), x_t plus a
    noise-level channel ("xt", lowdensity.noisy_net_input), or those and x0_hat ("xt+x0")."""
    if input not in GUIDANCE_INPUTS:
        raise ConfigError(f"unknown guidance input {input!r}; choose one of {GUIDANCE_INPUTS}")
    return {"x0": channels, "xt": channels + 1, "xt+x0": 2 * channels + 1}[input]


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Sampling-time settings of low-density guidance; copied into every sample's json."""

    alpha: float = 0.5  # scale of Normalize(grad L_g1), the hardness term (Eq. 7; paper default 0.5)
    beta: float = 0.5  # scale of Normalize(grad L_g2), the real-vs-synthetic fidelity term (paper default 0.5)
    tau: float = 1.0  # temperature of Eq. 4 and Eq. 6 (the paper gives no value)
    # hardness: Eq. 4/6 on class Gaussians of embeddings; softmax: the probability variant
    loss: Annotated[str, OneOf(GUIDANCE_LOSSES)] = "hardness"
    # what multiplies the normalized gradients: Sigma_theta read as the posterior std (Algorithm 1
    # as printed) or as the posterior variance (the guided-diffusion code the paper builds on)
    scale_by: Annotated[str, OneOf(GUIDANCE_SCALES)] = "std"

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        check_fields(self)

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.beta > 0
