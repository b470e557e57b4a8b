"""The Denoiser interface: every diffusion model is seen as D(x, sigma, labels) -> x0_hat.

Samplers, guidance, reconstruction and DiffAug only ever call a Denoiser, so a model trained by
us, a diffusers ``UNet2DModel`` loaded from disk, or a wrapped (guided, clamped) model are
interchangeable. Conventions: ``x`` is the noisy image in sigma-space (x = x0 + sigma * eps),
``sigma`` a tensor of shape [B] (or a scalar broadcast to the batch), images NCHW in [-1, 1].
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from tailforge.gen.core.errors import NonFiniteError
from tailforge.gen.diffusion.schedules import sigmas_from_alphas_cumprod

#: An epsilon network (an nn.Module): eps_model(x_vp, t, labels) -> eps, t a float tensor [B].
EpsModel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """D(x, sigma, labels) -> estimate of the clean image x0."""

    sigma_min: float
    sigma_max: float
    #: sigmas of the timesteps the model was trained on, ascending (DDPM/DDIM grids use them)
    train_sigmas: Tensor

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor: ...


def _batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class EpsDenoiser(nn.Module):
    """A DDPM epsilon-network plus its alpha_bar schedule, as a sigma-space Denoiser.

    DDPM (Ho et al. 2020, Eq. 4) trains eps_theta(x_t, t) on x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
    In sigma-space x = x_t / sqrt(ab_t), so the network input is c_in * x with
    c_in = 1 / sqrt(1 + sigma^2), and x0_hat = x - sigma * eps_hat (Karras et al. 2022, Table 1).
    sigma maps back to a (possibly fractional) timestep by interpolating log-sigma between the
    trained timesteps, as k-diffusion's DiscreteSchedule does.
    """

    def __init__(self, eps_model: EpsModel, alphas_cumprod: Tensor):
        super().__init__()
        self.eps_model = eps_model
        train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())
        self.register_buffer("train_sigmas", train_sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", train_sigmas.log().float(), persistent=False)
        self.sigma_min = float(train_sigmas[0])
        self.sigma_max = float(train_sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep for each sigma: linear interpolation in log-sigma, clamped to [0, T-1].

        Sigmas taken from the schedule itself come back as exact integers (the last line snaps
        float round-off), so DDPM/DDIM grids feed the network exactly the t it was trained on.
        """
        log_sigma = sigma.float().clamp_min(self.sigma_min).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        t = (low + w.clamp(0, 1)).float()
        return torch.where((t - t.round()).abs() < 1e-4, t.round(), t)

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        sigma = _batch_sigma(sigma, x)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        eps = self.eps_model(x / (1 + s**2).sqrt(), self.sigma_to_t(sigma), labels)
        return x - s * eps


class DenoiserWrapper(nn.Module):
    """Base for features added by wrapping a Denoiser (clamping, guidance): it forwards the
    schedule attributes so a wrapped denoiser is a Denoiser too."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner = inner
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max

    @property
    def train_sigmas(self) -> Tensor:
        return self.inner.train_sigmas

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return self.inner(x, sigma, labels)


class ClampDenoised(DenoiserWrapper):
    """Clamps x0_hat to the data range [-1, 1].

    This is DDPM's "clip x0" sampling trick (diffusers' ``clip_sample=True``): added by wrapping so
    every sampler gets it without a flag.
    """

    def __init__(self, denoiser: Denoiser, low: float = -1.0, high: float = 1.0):
        super().__init__(denoiser)
        self.low, self.high = low, high

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return self.inner(x, sigma, labels).clamp(self.low, self.high)


class CheckFinite(DenoiserWrapper):
    """Stops sampling at the first NaN or Inf in the model's output, naming the step and samples.

    Wrap the model itself (innermost, before ClampDenoised, which would turn Inf into +-1 and hide
    it). ``sigmas`` is the sampler's grid, used only to name the step; ``indices`` are the global
    sample indices of the batch rows. Raises NonFiniteError (the job adds the shard's name).
    """

    def __init__(self, denoiser: Denoiser, sigmas: Tensor | None = None, indices: list[int] | None = None):
        super().__init__(denoiser)
        self.sigmas = None if sigmas is None else sigmas.detach().float().cpu()
        self.indices = indices
        self.calls = 0

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        denoised = self.inner(x, sigma, labels)
        self.calls += 1
        finite = torch.isfinite(denoised).flatten(1).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten().tolist()
            kind = "NaN" if bool(torch.isnan(denoised[rows]).any()) else "Inf"
            level = float(_batch_sigma(sigma, x)[rows[0]])
            if self.sigmas is not None:
                step = int((self.sigmas - level).abs().argmin())
                where = f"step {step} of {len(self.sigmas) - 1} (sigma {level:.4g})"
            else:
                where = f"denoiser call {self.calls} (sigma {level:.4g})"
            # a guidance pass may denoise the batch twice over (rows N..2N-1: gen.methods.lowdensity's "xt+x0")
            samples = [self.indices[r % len(self.indices)] for r in rows] if self.indices is not None else rows
            raise NonFiniteError(f"the model produced {kind} at sampling {where} for samples {samples[:8]}"
                                 f"{' ...' if len(samples) > 8 else ''}")
        return denoised


class UNetEpsModel(nn.Module):
    """Adapts a diffusers ``UNet2DModel`` to the EpsModel signature eps(x_vp, t, labels).

    Class labels go to the U-Net only when it was built class-conditional (``num_class_embeds``).
    A conditional model trained with label dropout has a ``null_class`` label, given when no labels
    are passed (its unconditional denoiser, as in classifier-free guidance, Ho & Salimans 2022).
    A learned-variance network (output channels = 2 x input, improved DDPM) contributes only its
    epsilon half.
    """

    def __init__(self, unet: nn.Module, null_class: int | None = None):
        super().__init__()
        self.unet = unet
        self.conditional = getattr(unet.config, "num_class_embeds", None) is not None
        self.null_class = null_class
        self.in_channels = unet.config.in_channels

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.conditional and labels is None:
            if self.null_class is None:
                raise ValueError("this model is class-conditional: pass labels")
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.unet(x, t, class_labels=labels if self.conditional else None).sample
        return out[:, : self.in_channels]
