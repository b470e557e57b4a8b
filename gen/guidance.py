"""Low-density guidance (seed 000, Sehwag et al. 2022, Sec. 3.2, Eq. 7, Algorithm 1) as a Denoiser wrapper.

Algorithm 1, per reverse step t -> t-1:

    z ~ N(0, I), s = I           (z = 0, s = 0 on the last step, t = 1)
    u1 = alpha * Sigma_theta(x_t, t) * Normalize(grad L_g1(., y))
    u2 = beta  * Sigma_theta(x_t, t) * Normalize(grad L_g2(.))
    x_{t-1} = mu_theta(x_t, t) + Sigma_theta(x_t, t) z + s (u1 + u2)

:class:`LowDensityGuidance` wraps a Denoiser so the *unchanged* DDPM and DDIM samplers of
``gen.samplers`` take exactly that step. Both steps are affine in the denoised estimate,
``x_next = w * denoised + (terms without it)``, so returning ``denoised + s (u1 + u2) / w`` makes
the sampler's own step land on ``x_next + s (u1 + u2)``. The weight w is read off the pure step
function itself (``step(x=0, denoised=1, noise=0)``), so the wrapper composes with the step
functions instead of copying them (k-diffusion folds classifier guidance into the denoised output
the same way).

Choices Algorithm 1 leaves open, and what this module does:

* Where the gradient is taken. Algorithm 1 writes grad L(x_{t-1}) but needs u before x_{t-1}
  exists; as in Dhariwal & Nichol's classifier guidance, which the paper says it follows, the
  gradient is taken at the step's input. What the guidance networks see is a property of the
  guidance folder (``input``): "xt", a timestep-aware classifier on x_t (the paper's setup; here
  the noise level enters as an extra constant input channel) with class Gaussians fitted per noise
  level, or "x0", a plain classifier on the denoised estimate x0_hat, with the gradient taken with
  respect to x0_hat (no backward pass through the U-Net; DESIGN.md's reference runs).
* Sigma_theta in sigma-space (x = x_vp / sqrt(alpha_bar)) is ``ddpm_posterior_std``; the
  normalized gradient is a direction, so the update is the paper's VP-space update divided by
  sqrt(alpha_bar_{t-1}) like every other term of the step.
* DDIM (Song et al. 2021), which the paper says the method integrates with (Appendix A.7): at
  eta = 0 the step injects no noise, and scaling by the injected std would switch guidance off.
  Sigma_theta for a DDIM step is therefore the std of the DDPM posterior over the same step
  (``ddpm_posterior_std(sigma, sigma_next, "small")``, what eta = 1 would inject), whatever eta
  is: the guidance step size on a given sigma grid is then the same for DDPM and DDIM.
* The gradients are those of gen.hardness.direction_surrogate: the same normalized directions as
  the losses of Eq. 4 / Eq. 6, without the float32 underflow to 0 of a saturated softmax. A
  gradient that is exactly zero normalizes to zero, not to NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import CheckpointError, file_sha256, load_safetensors, read_json, write_json_atomic
from .classifier_nets import CLASSIFIER_WEIGHTS, load_classifier, save_classifier
from .denoiser import Denoiser, DenoiserWrapper
from .errors import ConfigError
from .hardness import ClassGaussians, direction_surrogate, hardness, hardness_matrix
from .samplers import ddim_step, ddpm_posterior_std, ddpm_step

#: what the guidance networks see at each step: the noisy x_t (timestep-aware nets) or x0_hat
GUIDANCE_INPUTS = ("xt", "x0")
#: "hardness": Eq. 4 / Eq. 6 on class Gaussians of embeddings; "softmax": the probability variant
GUIDANCE_LOSSES = ("hardness", "softmax")
GUIDANCE_FILE = "guidance.json"
GAUSSIANS_FILE = "gaussians.safetensors"
REAL_CLASS = 1  # discriminator labels: 0 synthetic, 1 real (Eq. 6)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Sampling-time settings of low-density guidance; copied into every sample's json."""

    alpha: float = 0.5  # scale of Normalize(grad L_g1), the hardness term (Eq. 7; paper default 0.5)
    beta: float = 0.5  # scale of Normalize(grad L_g2), the real-vs-synthetic fidelity term (paper default 0.5)
    tau: float = 1.0  # temperature of Eq. 4 and Eq. 6 (the paper gives no value)
    loss: str = "hardness"  # "hardness" (Eq. 4/6 on class Gaussians) or "softmax" (probability variant)

    def validate(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.loss not in GUIDANCE_LOSSES:
            raise ConfigError(f"unknown guidance loss {self.loss!r}; choose one of {GUIDANCE_LOSSES}")

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.beta > 0


def noisy_net_input(x: Tensor, sigma: Tensor | float) -> Tensor:
    """The input of a timestep-aware ("xt") guidance net for x in sigma-space at noise level sigma
    (a scalar or one per row): [c_in * x, c_noise map], c_in = 1 / sqrt(1 + sigma^2) (the DDPM
    network's own input scaling, x_t in VP space) and c_noise = ln(sigma) / 4 (EDM, Karras et al.
    2022, Table 1) as one constant extra channel, a noise-level map as in FFDNet (Zhang et al. 2018)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    s = sigma.view(-1, 1, 1, 1)
    level = (s.clamp_min(1e-8).log() / 4).expand(-1, 1, *x.shape[2:])
    return torch.cat([x / (1 + s**2).sqrt(), level], dim=1)


class GuidanceNet(nn.Module):
    """A classifier with the timm interface plus the class Gaussians of its embeddings.

    ``input`` fixes what it is fed: "x0" a clean-looking image in [-1, 1] (x0_hat while sampling);
    "xt" a noisy image in sigma-space with its sigma, through :func:`noisy_net_input`, which makes
    any timm classifier (built with one extra input channel) timestep-aware. ``gaussians[l]`` were
    fitted at noise level ``level_sigmas[l]`` (one level, sigma 0, for "x0").
    """

    def __init__(self, net: nn.Module, gaussians: list[ClassGaussians], level_sigmas: Tensor, input: str):
        super().__init__()
        if input not in GUIDANCE_INPUTS:
            raise ConfigError(f"unknown guidance input {input!r}; choose one of {GUIDANCE_INPUTS}")
        # channels_last: the guidance passes of a guided step (forward and input-gradient backward of
        # small convs) ran 1.2-1.3x faster in it than in NCHW on the 2-core CPU at batch 128, and
        # it is the layout GPU convolutions prefer (`tailforge bench guidance`)
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.gaussians = gaussians
        self.register_buffer("level_sigmas", level_sigmas.float(), persistent=False)
        self.input = input

    def net_input(self, image: Tensor, sigma: Tensor | float) -> Tensor:
        return image if self.input == "x0" else noisy_net_input(image, sigma)

    def forward(self, image: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """(embeddings [N, k], logits [N, C]) through timm's forward_features / forward_head."""
        feats = self.net.forward_features(self.net_input(image, sigma))
        return self.net.forward_head(feats, pre_logits=True), self.net.forward_head(feats)

    def gaussians_at(self, sigma: Tensor | float) -> ClassGaussians:
        """The class Gaussians of the noise level nearest to `sigma` in log-sigma."""
        if len(self.gaussians) == 1:
            return self.gaussians[0]
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0].clamp_min(1e-8).log()
        return self.gaussians[int((self.level_sigmas.cpu().clamp_min(1e-8).log() - s).abs().argmin())]

    def clean_sigma(self) -> float:
        """The sigma at which a finished (clean) sample is scored: 0 for "x0", the lowest level for "xt"."""
        return float(self.level_sigmas.min())


class GuidanceModels(nn.Module):
    """The two guidance networks of seed 000: the embedding classifier (hardness, L_g1) and the
    real-vs-synthetic discriminator (H', L_g2), as saved in one guidance folder."""

    def __init__(self, classifier: GuidanceNet, discriminator: GuidanceNet, info: dict[str, Any]):
        super().__init__()
        if classifier.input != discriminator.input:
            raise ConfigError("the classifier and the discriminator must see the same input (x0 or xt)")
        self.classifier, self.discriminator, self.info = classifier, discriminator, info
        #: forward+backward passes of a guidance net (batch rows), for cost accounting
        self.evals = 0

    @property
    def input(self) -> str:
        return self.classifier.input

    def sample_hardness(self, x0: Tensor, labels: Tensor) -> Tensor:
        """H(x, y) (Eq. 3) of finished samples under the guidance classifier's Gaussians."""
        with torch.no_grad():
            sigma = self.classifier.clean_sigma()
            emb, _ = self.classifier(x0, sigma)
            return hardness(emb, labels, self.classifier.gaussians_at(sigma))

    def scores(self, net: GuidanceNet, image: Tensor, sigma: Tensor, loss: str) -> Tensor:
        """Per-class scores a loss is built from: hardness H(x, j) (Eq. 3) or logits."""
        emb, logits = net(image, sigma)
        self.evals += len(image)
        return hardness_matrix(emb, net.gaussians_at(sigma)) if loss == "hardness" else logits

    def losses(self, image: Tensor, sigma: Tensor, labels: Tensor, config: GuidanceConfig,
               ) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample L_g1 (when alpha > 0) and L_g2 (when beta > 0) at `image`, Eq. 4 / Eq. 6 or
        their softmax-probability variants, as :func:`~tailforge.gen.hardness.direction_surrogate`:
        functions with the losses' normalized gradients that do not underflow when they saturate."""
        suffix = "" if config.loss == "hardness" else "_softmax"
        l1 = l2 = None
        if config.alpha > 0:
            l1 = direction_surrogate("g1" + suffix, self.scores(self.classifier, image, sigma, config.loss), labels,
                                     config.tau)
        if config.beta > 0:
            l2 = direction_surrogate("g2" + suffix, self.scores(self.discriminator, image, sigma, config.loss),
                                     REAL_CLASS, config.tau)
        return l1, l2


def normalize(u: Tensor, eps: float = 1e-12) -> Tensor:
    """Algorithm 1's Normalize(u) = u / ||u||, per sample (L2 norm over all of a sample's pixels)."""
    norm = u.flatten(1).norm(dim=1).view(-1, *([1] * (u.ndim - 1)))
    return u / norm.clamp_min(eps)


def guidance_direction(models: GuidanceModels, image: Tensor, sigma: Tensor, labels: Tensor,
                       config: GuidanceConfig) -> Tensor:
    """alpha * Normalize(grad L_g1) + beta * Normalize(grad L_g2), the gradients taken with respect
    to `image` (x_t or x0_hat, whatever the guidance nets see). The nets are in eval mode, so each
    sample's loss depends on that sample alone and one backward pass of the summed loss gives every
    per-sample gradient."""
    with torch.enable_grad():
        image = image.detach().requires_grad_(True)
        l1, l2 = models.losses(image, sigma, labels, config)
        direction = torch.zeros_like(image)
        for weight, loss in ((config.alpha, l1), (config.beta, l2)):
            if loss is not None:
                (grad,) = torch.autograd.grad(loss.sum(), image)
                direction = direction + weight * normalize(grad)
    return direction.detach()


@dataclasses.dataclass(frozen=True)
class StepRule:
    """How guidance enters one sampler: its pure step function and Algorithm 1's Sigma_theta."""

    step: Callable[..., Tensor]  # (x, denoised, sigma, sigma_next, noise) -> x_next, settings bound
    sigma_theta: Callable[[Tensor, Tensor], Tensor]  # (sigma, sigma_next) -> the step's Sigma_theta


def step_rule(sampler: str, settings: dict[str, Any]) -> StepRule:
    """The StepRule of a guided sampler: DDPM (Sigma = its posterior std) or DDIM (Sigma = the
    DDPM posterior std of the same step, whatever eta; see the module docstring)."""
    if sampler == "ddpm":
        variance = settings.get("variance", "small")
        return StepRule(functools.partial(ddpm_step, variance=variance),
                        functools.partial(ddpm_posterior_std, variance=variance))
    if sampler == "ddim":
        return StepRule(functools.partial(ddim_step, eta=settings.get("eta", 0.0)),
                        functools.partial(ddpm_posterior_std, variance="small"))
    raise ConfigError(f"low-density guidance runs with the ddpm or ddim sampler (Algorithm 1 is an ancestral "
                      f"step), not {sampler!r}")


class LowDensityGuidance(DenoiserWrapper):
    """Seed 000 Algorithm 1 as a Denoiser wrapper for the ddpm / ddim samplers on grid `sigmas`.

    Wrap the (clamped) denoiser; the sampler then takes Algorithm 1's step. Labels are required
    (L_g1 needs the class being generated). With alpha = beta = 0 it returns the inner denoiser's
    output untouched, so the samples equal the baseline sampler's bit for bit.
    """

    def __init__(self, inner: Denoiser, models: GuidanceModels, config: GuidanceConfig, sigmas: Tensor,
                 rule: StepRule):
        super().__init__(inner)
        config.validate()
        self.models, self.config, self.rule = models, config, rule
        self.register_buffer("sigmas", sigmas.float().cpu(), persistent=False)

    def step_sigmas(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma, sigma_next) of the grid step the sampler is taking at `sigma`."""
        s = sigma.reshape(-1)[0].float().cpu()
        i = int((self.sigmas[:-1] - s).abs().argmin())
        if not torch.isclose(self.sigmas[i], s, rtol=1e-5, atol=0):
            raise ConfigError(f"guided denoiser called at sigma={float(s):.6g}, which is not on its sampling grid; "
                              "run it with the ddpm or ddim sampler on the grid it was built with")
        return self.sigmas[i], self.sigmas[i + 1]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        denoised = self.inner(x, sigma, labels)
        if not self.config.active:
            return denoised
        if labels is None:
            raise ConfigError("low-density guidance needs class labels (L_g1 is defined for the generated class)")
        s, s_next = (t.to(device=x.device, dtype=x.dtype) for t in self.step_sigmas(torch.as_tensor(sigma)))
        if s_next == 0:  # Algorithm 1: s = 0 on the last step
            return denoised
        target = x if self.models.input == "xt" else denoised
        shift = self.rule.sigma_theta(s, s_next) * guidance_direction(self.models, target, s, labels, self.config)
        ones = torch.ones((), dtype=x.dtype, device=x.device)
        weight = self.rule.step(ones * 0, ones, s, s_next, ones * 0)  # d x_next / d denoised
        return denoised + shift / weight


def guided_wrapper(models: GuidanceModels, config: GuidanceConfig, sampler: str,
                   settings: dict[str, Any]) -> Callable[[Denoiser, Tensor], Denoiser]:
    """A ``wrap(denoiser, sigmas)`` for :func:`gen.baseline.generate_batch`."""
    rule = step_rule(sampler, settings)
    return lambda denoiser, sigmas: LowDensityGuidance(denoiser, models, config, sigmas, rule)


# -- guidance folders -------------------------------------------------------------------------------
#
#   DIR/guidance.json           input (x0 | xt), level sigmas, training config and figures, hashes
#   DIR/classifier/             the embedding classifier (classifier.json + classifier.safetensors)
#   DIR/discriminator/          the real-vs-synthetic discriminator (same format)
#   DIR/gaussians.safetensors   class Gaussians of both, per noise level
#
# guidance.json is written last, so a folder without it is incomplete and is not loaded.

def save_guidance(folder: str | os.PathLike, classifier: GuidanceNet, classifier_config: dict[str, Any],
                  discriminator: GuidanceNet, discriminator_config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write a guidance folder; returns the guidance.json written (info plus input, levels, hashes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GUIDANCE_FILE).unlink(missing_ok=True)
    state = {"level_sigmas": classifier.level_sigmas.cpu()}
    for name, net, config in (("classifier", classifier, classifier_config),
                              ("discriminator", discriminator, discriminator_config)):
        save_classifier(folder / name, net.net, {**config, "guidance_input": net.input})
        for level, g in enumerate(net.gaussians):
            state.update(g.state(f"{name}.level{level}"))
    tmp = folder / f".{GAUSSIANS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / GAUSSIANS_FILE)
    full = {**info, "input": classifier.input, "level_sigmas": classifier.level_sigmas.tolist(),
            "classifier_sha256": file_sha256(folder / "classifier" / CLASSIFIER_WEIGHTS),
            "guidance_hash": _guidance_hash(folder)}
    write_json_atomic(folder / GUIDANCE_FILE, full)
    return full


def _guidance_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("classifier/" + CLASSIFIER_WEIGHTS, "discriminator/" + CLASSIFIER_WEIGHTS, GAUSSIANS_FILE):
        digest.update(file_sha256(folder / name).encode())
    return digest.hexdigest()[:16]


def load_guidance(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GuidanceModels:
    """Load a guidance folder written by `tailforge train guidance`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"guidance folder does not exist: {folder}")
    info = read_json(folder / GUIDANCE_FILE, "guidance description (written last by `tailforge train guidance`)")
    state = load_safetensors(folder / GAUSSIANS_FILE)
    if "level_sigmas" not in state or info.get("input") not in GUIDANCE_INPUTS:
        raise CheckpointError(f"{folder} is not a complete guidance folder (level_sigmas / input missing)")
    levels = state["level_sigmas"]
    nets = []
    for name in ("classifier", "discriminator"):
        net, _ = load_classifier(folder / name, device)
        try:
            gaussians = [ClassGaussians.from_state(state, f"{name}.level{i}").to(device) for i in range(len(levels))]
        except ConfigError as err:
            raise CheckpointError(f"{folder / GAUSSIANS_FILE}: {err}") from None
        nets.append(GuidanceNet(net, gaussians, levels, info["input"]).to(device))
    return GuidanceModels(nets[0], nets[1], info)
