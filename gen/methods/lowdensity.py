"""Hardness score and the low-density guidance losses of Sehwag et al. 2022 (CVPR).

Pure functions of tensors:

* :func:`fit_class_gaussians`: one Gaussian per class of classifier embeddings (Sec. 3.2.1: "sample
  mean and sample covariance for embeddings of class y"), with Ledoit-Wolf shrinkage where the
  sample covariance is not usable (fewer samples than dimensions, or singular).
* :func:`hardness_matrix` / :func:`hardness`: H(x, y), Eq. 3, the negative Gaussian log-likelihood
  of an embedding under class y.
* :func:`loss_g1` (Eq. 4, temperature tau) and its softmax-probability variant
  :func:`loss_g1_softmax`; :func:`loss_g2` (Eq. 6) and :func:`loss_g2_softmax`. All are per sample
  ([N]) and are *maximized* by the sampler (Algorithm 1 adds their normalized gradients).
* :func:`direction_surrogate`: what the sampler differentiates instead. Algorithm 1 only uses
  Normalize(grad L), and each loss's gradient is a positive per-sample multiple of the gradient of
  a "contrast" that does not saturate (see there), so the normalized directions are identical
  while the plain losses' gradients underflow to exactly 0 in float32 once the softmax saturates
  (hardness gaps of thousands of nats between classes are usual).

Everything is differentiable in the features, so the guided sampler takes gradients through them.

The guided step, a Denoiser wrapper.

Algorithm 1, per reverse step t -> t-1:

    z ~ N(0, I), s = I           (z = 0, s = 0 on the last step, t = 1)
    u1 = alpha * Sigma_theta(x_t, t) * Normalize(grad L_g1(., y))
    u2 = beta  * Sigma_theta(x_t, t) * Normalize(grad L_g2(.))
    x_{t-1} = mu_theta(x_t, t) + Sigma_theta(x_t, t) z + s (u1 + u2)

:class:`LowDensityGuidance` wraps a Denoiser so the *unchanged* DDPM and DDIM samplers of
``gen.diffusion.samplers`` take exactly that step. Both steps are affine in the denoised estimate,
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
* "xt+x0", the denoise-augmented (DA) classifiers of Sastry et al. 2023: the nets see x_t (as for
  "xt") and the model's denoised estimate x0_hat(x_t) as simultaneous inputs, x0_hat taken
  *without* labels (the null class of a label-dropout model), so the class being generated never
  reaches the classifier's input. The gradient is taken with respect to x_t through both inputs,
  the second through the U-Net: their Theorem 1 has d x0_hat / d x_t = Cov[x0 | x_t] / sigma^2,
  which is what aligns these gradients with the image. The leaves of the two losses are denoised as
  one batch with grad enabled: one extra U-Net forward and backward per guided step (rows counted in
  ``GuidanceModels.unet_evals``). A finished sample is scored at the lowest level with x0_hat = the
  sample itself (see :meth:`GuidanceModels.sample_hardness`).
* Sigma_theta in sigma-space (x = x_vp / sqrt(alpha_bar)) is ``ddpm_posterior_std``; the
  normalized gradient is a direction, so the update is the paper's VP-space update divided by
  sqrt(alpha_bar_{t-1}) like every other term of the step.
* DDIM (Song et al. 2021), which the paper says the method integrates with (Appendix A.7): at
  eta = 0 the step injects no noise, and scaling by the injected std would switch guidance off.
  Sigma_theta for a DDIM step is therefore the std of the DDPM posterior over the same step
  (``ddpm_posterior_std(sigma, sigma_next, "small")``, what eta = 1 would inject), whatever eta
  is: the guidance step size on a given sigma grid is then the same for DDPM and DDIM.
* Which samplers: those whose registry entry has a StepRule (DDPM, DDIM). The multistep few-step
  solvers (DPM-Solver++(2M), UniPC; gen.diffusion.solvers) are refused with one line: their step
  re-uses earlier denoised estimates, so a shift folded into one estimate would leak into later
  steps and the update would no longer be Algorithm 1's (gen.diffusion.solvers' docstring).
* The gradients are those of gen.methods.lowdensity.direction_surrogate: the same normalized directions as
  the losses of Eq. 4 / Eq. 6, without the float32 underflow to 0 of a saturated softmax. A
  gradient that is exactly zero normalizes to zero, not to NaN.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.config import SamplingConfig, guided_sampler_names, guided_sampler_spec
from tailforge.gen.diffusion.denoiser import Denoiser, DenoiserWrapper
from tailforge.gen.diffusion.samplers import StepRule, generate_batch
from tailforge.gen.methods.config import GUIDANCE_INPUTS, GUIDANCE_SCALES, SHRINKAGE, GuidanceConfig
from tailforge.gen.models.diffusion import DiffusionModel


@dataclasses.dataclass(frozen=True)
class ClassGaussians:
    """Per-class Gaussians N(mu_y, Sigma_y) of k-dimensional embeddings, C classes."""

    means: Tensor  # [C, k] class means mu_y
    scale_tril: Tensor  # [C, k, k] lower Cholesky factor L_y of Sigma_y = L_y L_y^T
    shrinkage: Tensor  # [C] Ledoit-Wolf shrinkage used per class (0 = plain sample covariance)
    counts: Tensor  # [C] embeddings each class was fitted on

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @functools.cached_property
    def whitening(self) -> Tensor:
        """[C, k, k] L_y^-1, float64, formed once from the stored factors: hardness_matrix's Mahalanobis
        term is then a batched matmul. A batched triangular solve on every call was 20-200x the cost
        of the matmul on the 2-core CPU at guidance sizes (10 classes, k = 64, batch 128), forward
        and backward, the most expensive op of the guidance direction under load."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.scale_tril.device)
        return torch.linalg.solve_triangular(self.scale_tril.double(), eye, upper=False)

    def to(self, device: torch.device | str) -> "ClassGaussians":
        # hardness_matrix moves the Gaussians to the features' device on every guided step: a no-op
        # where they are already there (keeping the cached whitening), and fields read one by one
        # (dataclasses.astuple deep-copies every tensor, which was 9 % of the guidance direction)
        device = torch.device(device)
        if all(getattr(self, f.name).device == device for f in dataclasses.fields(self)):
            return self
        moved = ClassGaussians(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))
        moved.__dict__["whitening"] = self.whitening.to(device)  # cached_property's slot: not formed again
        return moved

    def state(self, prefix: str) -> dict[str, Tensor]:
        """Tensors for a safetensors file, keyed ``{prefix}.{field}``."""
        return {f"{prefix}.{f.name}": getattr(self, f.name).contiguous().cpu() for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> "ClassGaussians":
        try:
            return cls(**{f.name: state[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls)})
        except KeyError as err:
            raise ConfigError(f"class Gaussians {prefix!r} lack tensor {err}") from None


def _class_covariance(features: np.ndarray, shrinkage: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, covariance and the shrinkage used for one class's embeddings [n, k].

    "auto" uses the paper's sample covariance when it is positive definite (n > k and no degenerate
    direction, e.g. a ReLU unit that never fires), and scikit-learn's Ledoit-Wolf estimate otherwise:
    its shrinkage toward a scaled identity makes the covariance invertible and is chosen
    analytically (Ledoit & Wolf 2004), so no tuning is involved.
    """
    n, k = features.shape
    mean = features.mean(axis=0)
    if shrinkage in ("auto", "none") and n > k:
        cov = np.cov(features, rowvar=False, ddof=1).reshape(k, k)
        if shrinkage == "none" or np.linalg.eigvalsh(cov)[0] > 1e-6 * max(np.trace(cov) / k, 1e-12):
            return mean, cov, 0.0
    if shrinkage == "none":
        raise ConfigError(f"a class has {n} embeddings of dimension {k}: the sample covariance is singular; "
                          "use shrinkage 'auto' or 'ledoit_wolf'")
    lw = LedoitWolf().fit(features)
    return mean, lw.covariance_, float(lw.shrinkage_)


def fit_class_gaussians(features: Tensor, labels: Tensor, num_classes: int, shrinkage: str = "auto") -> ClassGaussians:
    """Fit N(mu_y, Sigma_y) to the embeddings of each class (Sehwag et al. 2022, Sec. 3.2.1).

    ``shrinkage``: "auto" (sample covariance, Ledoit-Wolf where that is singular or n <= k),
    "ledoit_wolf" (always shrink), "none" (sample covariance; an error where it is singular).
    Computed in float64 and stored as float32 Cholesky factors.
    """
    if shrinkage not in SHRINKAGE:
        raise ConfigError(f"unknown shrinkage {shrinkage!r}; choose one of {SHRINKAGE}")
    if features.ndim != 2 or len(features) != len(labels):
        raise ConfigError(f"expected features [N, k] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    feats = features.detach().double().cpu().numpy()
    labs = labels.cpu().numpy()
    means, trils, shrinks, counts = [], [], [], []
    for c in range(num_classes):
        rows = feats[labs == c]
        if len(rows) < 2:
            raise ConfigError(f"class {c} has {len(rows)} embeddings; at least 2 are needed to fit its Gaussian")
        mean, cov, shrink = _class_covariance(rows, shrinkage)
        means.append(mean)
        trils.append(np.linalg.cholesky(cov))
        shrinks.append(shrink)
        counts.append(len(rows))
    return ClassGaussians(means=torch.tensor(np.stack(means), dtype=torch.float32),
                          scale_tril=torch.tensor(np.stack(trils), dtype=torch.float32),
                          shrinkage=torch.tensor(shrinks, dtype=torch.float32),
                          counts=torch.tensor(counts, dtype=torch.long))


def hardness_matrix(features: Tensor, gaussians: ClassGaussians) -> Tensor:
    """H(x, j) for every class j (Eq. 3), shape [N, C]:

        H(x, j) = 1/2 [ (f - mu_j)^T Sigma_j^-1 (f - mu_j) + ln det Sigma_j + k ln 2 pi ]

    through the Cholesky factor: the Mahalanobis term is ||L_j^-1 (f - mu_j)||^2, with L_j^-1 formed
    once per ClassGaussians in float64 (:attr:`ClassGaussians.whitening`), and
    ln det Sigma_j = 2 sum ln diag L_j; Sigma_j itself is never inverted.
    """
    g = gaussians.to(features.device)
    diff = (features.unsqueeze(0) - g.means.unsqueeze(1)).transpose(1, 2)  # [C, k, N]
    white = g.whitening.to(features.dtype) @ diff.to(features.dtype)
    mahalanobis = white.pow(2).sum(dim=1)  # [C, N]
    log_det = 2 * torch.diagonal(g.scale_tril, dim1=-2, dim2=-1).log().sum(-1).to(features.dtype)  # [C]
    return 0.5 * (mahalanobis + log_det.unsqueeze(1) + g.dim * math.log(2 * math.pi)).T


def hardness(features: Tensor, labels: Tensor, gaussians: ClassGaussians) -> Tensor:
    """H(x_i, y_i) of Eq. 3 for each embedding under its own class, shape [N]."""
    return hardness_matrix(features, gaussians).gather(1, labels.view(-1, 1).to(features.device)).squeeze(1)


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ConfigError(f"temperature tau must be > 0, got {tau}")


def loss_g1(hardness_all: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Contrastive guidance loss of Eq. 4, per sample, to be maximized:

        L_g1(x, y) = log [ exp(H(x, y) / tau) / sum_j exp(H(x, j) / tau) ]

    ``hardness_all`` is :func:`hardness_matrix` ([N, C]). Maximizing it raises the hardness of x
    in its own class relative to the other classes (low likelihood in the correct class).
    """
    _check_tau(tau)
    return F.log_softmax(hardness_all / tau, dim=1).gather(1, labels.view(-1, 1).to(hardness_all.device)).squeeze(1)


def loss_g1_softmax(logits: Tensor, labels: Tensor, tau: float) -> Tensor:
    """The softmax-probability variant of L_g1 (Sec. 3.2.1: "minimize the output softmax probability
    in the correct class"), per sample, to be maximized: -log p_tau(y | x) with p_tau =
    softmax(logits / tau). Its gradient is that of -p_tau(y | x) divided by p_tau(y | x) > 0, so
    after the per-sample normalization of Algorithm 1 both give the same direction; the log form
    stays well scaled when p is tiny.
    """
    _check_tau(tau)
    return -F.log_softmax(logits / tau, dim=1).gather(1, labels.view(-1, 1).to(logits.device)).squeeze(1)


def loss_g2(disc_hardness_all: Tensor, tau: float, real_class: int = 1) -> Tensor:
    """Fidelity guidance loss of Eq. 6, per sample, to be maximized:

        L_g2(x) = -log [ exp(H'(x, 1) / tau) / sum_{j in {0, 1}} exp(H'(x, j) / tau) ]

    with H' the hardness score (Eq. 3) of the real-vs-synthetic discriminator's embedding Gaussians,
    ``disc_hardness_all`` = [N, 2] (class 0 synthetic, class 1 real). Maximizing it lowers the
    hardness under "real" relative to "synthetic", i.e. pulls the sample toward the real data.
    """
    _check_tau(tau)
    return -F.log_softmax(disc_hardness_all / tau, dim=1)[:, real_class]


def loss_g2_softmax(disc_logits: Tensor, tau: float, real_class: int = 1) -> Tensor:
    """Softmax-probability variant of L_g2, to be maximized: log p_tau(real | x) from the
    discriminator's logits (the counterpart of :func:`loss_g1_softmax`)."""
    _check_tau(tau)
    return F.log_softmax(disc_logits / tau, dim=1)[:, real_class]


def contrast(scores: Tensor, target: Tensor | int, tau: float) -> Tensor:
    """s_target - sum_{j != target} q_j s_j with q = softmax over j != target of s_j / tau, q held
    constant (no gradient through it); per sample, [N].

    For any scores s, d/ds log softmax(s / tau)_target = (1 - p_target) / tau * d contrast / ds,
    with p = softmax(s / tau): the log-softmax gradient is this contrast's gradient times a positive
    per-sample factor, which underflows to 0 when p_target -> 1 although the direction is defined.
    """
    _check_tau(tau)
    target = torch.as_tensor(target, device=scores.device).expand(scores.shape[0]).view(-1, 1)
    own = scores.gather(1, target).squeeze(1)
    others = scores.detach().scatter(1, target, float("-inf"))
    q = torch.softmax(others / tau, dim=1)  # 0 at the target column
    return own - (q * scores).sum(dim=1)


def direction_surrogate(loss: str, scores: Tensor, target: Tensor | int, tau: float) -> Tensor:
    """A per-sample function whose gradient is a positive multiple of the gradient of

        "g1"          L_g1 (Eq. 4)          scores = hardness_matrix, target = labels
        "g1_softmax"  loss_g1_softmax       scores = classifier logits, target = labels
        "g2"          L_g2 (Eq. 6)          scores = discriminator hardness_matrix, target = real class
        "g2_softmax"  loss_g2_softmax       scores = discriminator logits, target = real class

    so Normalize(grad) (Algorithm 1) is the same for both, without the saturation underflow.
    Signs: L_g1 = log softmax(H / tau)_y and loss_g2_softmax = log softmax(l / tau)_real follow
    +contrast; L_g2 and loss_g1_softmax are minus a log-softmax and follow -contrast.
    """
    signs = {"g1": 1.0, "g1_softmax": -1.0, "g2": -1.0, "g2_softmax": 1.0}
    if loss not in signs:
        raise ConfigError(f"unknown guidance loss {loss!r}; choose one of {sorted(signs)}")
    return signs[loss] * contrast(scores, target, tau)


REAL_CLASS = 1  # discriminator labels: 0 synthetic, 1 real (Eq. 6)


def noisy_net_input(x: Tensor, sigma: Tensor | float) -> Tensor:
    """The input of a timestep-aware ("xt") guidance net for x in sigma-space at noise level sigma
    (a scalar or one per row): [c_in * x, c_noise map], c_in = 1 / sqrt(1 + sigma^2) (the DDPM
    network's own input scaling, x_t in VP space) and c_noise = ln(sigma) / 4 (EDM, Karras et al.
    2022, Table 1) as one constant extra channel, a noise-level map as in FFDNet (Zhang et al. 2018)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    s = sigma.view(-1, 1, 1, 1)
    level = (s.clamp_min(1e-8).log() / 4).expand(-1, 1, *x.shape[2:])
    return torch.cat([x / (1 + s**2).sqrt(), level], dim=1)


def guidance_net_input(input: str, image: Tensor, sigma: Tensor | float, denoised: Tensor | None = None) -> Tensor:
    """What a guidance net of `input` sees (guidance_in_chans channels): "x0" the image itself; "xt"
    :func:`noisy_net_input` of the noisy image; "xt+x0" that and the denoised estimate ``denoised``
    (x0_hat of `image`, required there, unused otherwise) concatenated along channels, Sastry et
    al. 2023's denoise-augmented input."""
    if input == "x0":
        return image
    if input == "xt":
        return noisy_net_input(image, sigma)
    if input != "xt+x0":
        raise ConfigError(f"unknown guidance input {input!r}; choose one of {GUIDANCE_INPUTS}")
    if denoised is None:
        raise ConfigError('a denoise-augmented ("xt+x0") guidance net needs the denoised estimate x0_hat too')
    return torch.cat([noisy_net_input(image, sigma), denoised], dim=1)


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """A copy of an eval-mode `net` with every BatchNorm2d that directly follows a Conv2d in an
    nn.Sequential folded into that convolution (w' = w gamma / sqrt(var + eps), b' = (b - mean)
    gamma / sqrt(var + eps) + beta, torch.nn.utils.fusion): the same function up to float round-off,
    without the normalization's forward and backward passes. Other layouts are left as they are."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                    module[i + 1] = nn.Identity()
    return net


class GuidanceNet(nn.Module):
    """A classifier with the timm interface plus the class Gaussians of its embeddings.

    ``input`` fixes what it is fed: "x0" a clean-looking image in [-1, 1] (x0_hat while sampling);
    "xt" a noisy image in sigma-space with its sigma, through :func:`noisy_net_input`, which makes
    any timm classifier (built with one extra input channel) timestep-aware; "xt+x0" that plus the
    denoised estimate x0_hat of the noisy image (:func:`guidance_net_input`, 2 C + 1 channels).
    ``gaussians[l]`` were fitted at noise level ``level_sigmas[l]`` (one level, sigma 0, for "x0").

    ``net`` is the classifier as given (frozen, in eval mode; what a guidance folder saves);
    ``inference_net`` is the copy every pass runs, its batch norms folded into the convolutions
    (:func:`fold_batch_norms`): on TinyCNN the folded forward and input-gradient backward take
    about a fifth less CPU time, the normalization's backward having been the most expensive op.
    """

    def __init__(self, net: nn.Module, gaussians: list[ClassGaussians], level_sigmas: Tensor, input: str):
        super().__init__()
        if input not in GUIDANCE_INPUTS:
            raise ConfigError(f"unknown guidance input {input!r}; choose one of {GUIDANCE_INPUTS}")
        self.net = net.eval().requires_grad_(False)
        # channels_last: the guidance passes of a guided step (forward and input-gradient backward of
        # small convs) ran 1.2-1.3x faster in it than in NCHW on the 2-core CPU at batch 128, and
        # it is the layout GPU convolutions prefer (`tailforge bench guidance`)
        self.inference_net = fold_batch_norms(self.net).to(memory_format=torch.channels_last)
        self.gaussians = gaussians
        self.register_buffer("level_sigmas", level_sigmas.float(), persistent=False)
        self.input = input

    def forward(self, image: Tensor, sigma: Tensor | float, denoised: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(embeddings [N, k], logits [N, C]) through timm's forward_features / forward_head;
        ``denoised``: x0_hat of `image`, needed by "xt+x0" only (:func:`guidance_net_input`)."""
        feats = self.inference_net.forward_features(guidance_net_input(self.input, image, sigma, denoised))
        return self.inference_net.forward_head(feats, pre_logits=True), self.inference_net.forward_head(feats)

    def gaussians_at(self, sigma: Tensor | float) -> ClassGaussians:
        """The class Gaussians of the noise level nearest to `sigma` in log-sigma."""
        if len(self.gaussians) == 1:
            return self.gaussians[0]
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0].clamp_min(1e-8).log()
        return self.gaussians[int((self.level_sigmas.cpu().clamp_min(1e-8).log() - s).abs().argmin())]

    def clean_sigma(self) -> float:
        """The sigma at which a finished (clean) sample is scored: 0 for "x0", the lowest level otherwise."""
        return float(self.level_sigmas.min())


class GuidanceModels(nn.Module):
    """The two guidance networks of Sehwag et al. 2022: the embedding classifier (hardness, L_g1) and the
    real-vs-synthetic discriminator (H', L_g2), as saved in one guidance folder."""

    def __init__(self, classifier: GuidanceNet, discriminator: GuidanceNet, info: dict[str, Any]):
        super().__init__()
        if classifier.input != discriminator.input:
            raise ConfigError(f"the classifier and the discriminator must see the same input, got "
                              f"{classifier.input!r} and {discriminator.input!r}")
        self.classifier, self.discriminator, self.info = classifier, discriminator, info
        #: forward+backward passes of a guidance net (batch rows), for cost accounting
        self.evals = 0
        #: U-Net forward+backward passes (batch rows) that "xt+x0" guidance adds to the sampler's own
        self.unet_evals = 0

    @property
    def input(self) -> str:
        return self.classifier.input

    def sample_hardness(self, x0: Tensor, labels: Tensor) -> Tensor:
        """H(x, y) (Eq. 3) of finished samples under the guidance classifier's Gaussians. "xt+x0" nets
        get the sample itself as its x0_hat: at the lowest level (sigma_min, 0.01 on DDPM's linear
        schedule) the denoised estimate is the sample to within that noise, and no U-Net pass is spent."""
        with torch.no_grad():
            sigma = self.classifier.clean_sigma()
            emb, _ = self.classifier(x0, sigma, x0)
            return hardness(emb, labels, self.classifier.gaussians_at(sigma))

    def scores(self, net: GuidanceNet, image: Tensor, sigma: Tensor, loss: str, denoised: Tensor | None = None,
               ) -> Tensor:
        """Per-class scores a loss is built from: hardness H(x, j) (Eq. 3) or logits."""
        emb, logits = net(image, sigma, denoised)
        self.evals += len(image)
        return hardness_matrix(emb, net.gaussians_at(sigma)) if loss == "hardness" else logits

    def losses(self, images: tuple[Tensor, Tensor], sigma: Tensor, labels: Tensor, config: GuidanceConfig,
               denoised: tuple[Tensor | None, Tensor | None] = (None, None)) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample L_g1 (when alpha > 0) at ``images[0]`` and L_g2 (when beta > 0) at ``images[1]``,
        Eq. 4 / Eq. 6 or their softmax-probability variants, as
        :func:`~tailforge.gen.methods.lowdensity.direction_surrogate`: functions with the losses'
        normalized gradients that do not underflow when they saturate. (One input per loss, so that
        one backward call can return the two gradients apart; pass the same image twice otherwise.)
        ``denoised``: each image's x0_hat, for "xt+x0" nets."""
        suffix = "" if config.loss == "hardness" else "_softmax"
        l1 = l2 = None
        if config.alpha > 0:
            l1 = direction_surrogate("g1" + suffix, self.scores(self.classifier, images[0], sigma, config.loss,
                                                                denoised[0]), labels, config.tau)
        if config.beta > 0:
            l2 = direction_surrogate("g2" + suffix, self.scores(self.discriminator, images[1], sigma, config.loss,
                                                                denoised[1]), REAL_CLASS, config.tau)
        return l1, l2


def normalize(u: Tensor, eps: float = 1e-12) -> Tensor:
    """Algorithm 1's Normalize(u) = u / ||u||, per sample (L2 norm over all of a sample's pixels)."""
    norm = u.flatten(1).norm(dim=1).view(-1, *([1] * (u.ndim - 1)))
    return u / norm.clamp_min(eps)


def denoised_leaves(models: GuidanceModels, denoiser: Denoiser | None, leaves: tuple[Tensor, Tensor], sigma: Tensor,
                    config: GuidanceConfig) -> tuple[Tensor | None, Tensor | None]:
    """x0_hat of each leaf a loss uses (alpha > 0: leaf 0, beta > 0: leaf 1) for "xt+x0" nets, (None, None)
    for the others: `denoiser` without labels, grad enabled, the used leaves as one batch."""
    if models.input != "xt+x0":
        return None, None
    if denoiser is None:
        raise ConfigError('"xt+x0" guidance needs the denoiser whose x0_hat(x_t) its nets see')
    used = [i for i, weight in enumerate((config.alpha, config.beta)) if weight > 0]
    if not used:
        return None, None
    n = len(leaves[0])
    sigmas = torch.as_tensor(sigma, dtype=leaves[0].dtype, device=leaves[0].device).expand(n).repeat(len(used))
    found = dict(zip(used, denoiser(torch.cat([leaves[i] for i in used]), sigmas).split(n)))
    models.unet_evals += n * len(used)
    return found.get(0), found.get(1)


def guidance_direction(models: GuidanceModels, image: Tensor, sigma: Tensor, labels: Tensor,
                       config: GuidanceConfig, denoiser: Denoiser | None = None) -> Tensor:
    """alpha * Normalize(grad L_g1) + beta * Normalize(grad L_g2), the gradients taken with respect
    to `image` (x_t or x0_hat, whatever the guidance nets see). The nets are in eval mode, so each
    sample's loss depends on that sample alone and the gradient of the summed loss gives every
    per-sample gradient. Each loss sees its own leaf copy of `image`, so a single autograd call
    runs both backward passes and still returns the two gradients apart (they are normalized
    separately); two calls, one per loss, cost about a tenth more CPU time on the 2-core CPU.
    For "xt+x0" nets each leaf's x0_hat comes from `denoiser` without labels (:func:`denoised_leaves`),
    so the gradients flow through the U-Net too (Sastry et al. 2023); other inputs ignore `denoiser`."""
    with torch.enable_grad():
        leaves = (image.detach().requires_grad_(True), image.detach().requires_grad_(True))
        denoised = denoised_leaves(models, denoiser, leaves, sigma, config)
        terms = [(weight, leaf, loss) for weight, leaf, loss in
                 zip((config.alpha, config.beta), leaves, models.losses(leaves, sigma, labels, config, denoised))
                 if loss is not None]
        direction = torch.zeros_like(image)
        if terms:
            grads = torch.autograd.grad([loss.sum() for _, _, loss in terms], [leaf for _, leaf, _ in terms])
            for (weight, _, _), grad in zip(terms, grads):
                direction = direction + weight * normalize(grad)
    return direction.detach()


def step_rule(sampler: str, settings: dict[str, Any]) -> StepRule:
    """The StepRule the sampler's spec declares for guidance (DDPM: Sigma = its posterior std; DDIM:
    Sigma = the DDPM posterior std of the same step, whatever eta; see the module docstring)."""
    return guided_sampler_spec(sampler).step_rule_fn()(settings)


def guidance_scale(std: Tensor, sigma_next: Tensor, scale_by: str) -> Tensor:
    """The factor in front of Algorithm 1's normalized gradients, in sigma-space.

    ``std``: Sigma_theta is the step's posterior std, as Algorithm 1 prints it; in sigma-space
    (x = x_vp / sqrt(alpha_bar)) that is `std` itself. ``variance``: the guided-diffusion code the
    paper builds on adds ``variance * gradient`` to the VP-space mean (Dhariwal & Nichol 2021,
    condition_mean); the VP variance is (std * sqrt(alpha_bar_next))^2, divided by
    sqrt(alpha_bar_next) to return to sigma-space: std^2 * sqrt(alpha_bar_next), with
    alpha_bar_next = 1 / (1 + sigma_next^2). The two differ by a factor of the VP std: on a 1000-step
    linear schedule "variance" pushes about 7x less at the first step and 135x less at the last, so
    the same alpha and beta guide far more gently, above all late in the chain."""
    if scale_by == "std":
        return std
    if scale_by == "variance":
        return std**2 / (1 + sigma_next**2).sqrt()
    raise ConfigError(f"unknown guidance scale {scale_by!r}; choose one of {GUIDANCE_SCALES}")


class LowDensityGuidance(DenoiserWrapper):
    """Sehwag et al. 2022 Algorithm 1 as a Denoiser wrapper for the ddpm / ddim samplers on grid `sigmas`.

    Wrap the (clamped) denoiser; the sampler then takes Algorithm 1's step. Labels are required
    (L_g1 needs the class being generated). With alpha = beta = 0 it returns the inner denoiser's
    output untouched, so the samples equal the baseline sampler's bit for bit.
    """

    def __init__(self, inner: Denoiser, models: GuidanceModels, config: GuidanceConfig, sigmas: Tensor,
                 rule: StepRule):
        super().__init__(inner)
        self.models, self.config, self.rule = models, config, rule
        self.register_buffer("sigmas", sigmas.float().cpu(), persistent=False)

    def step_sigmas(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma, sigma_next) of the grid step the sampler is taking at `sigma`."""
        s = sigma.reshape(-1)[0].float().cpu()
        i = int((self.sigmas[:-1] - s).abs().argmin())
        if not torch.isclose(self.sigmas[i], s, rtol=1e-5, atol=0):
            raise ConfigError(f"guided denoiser called at sigma={float(s):.6g}, which is not on its sampling grid; "
                              f"run it with the {guided_sampler_names()} sampler on the grid it was built with")
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
        target = denoised if self.models.input == "x0" else x
        scale = guidance_scale(self.rule.sigma_theta(s, s_next), s_next, self.config.scale_by)
        # "xt+x0": the nets' x0_hat is the wrapped denoiser's own, called again without labels
        shift = scale * guidance_direction(self.models, target, s, labels, self.config, self.inner)
        ones = torch.ones((), dtype=x.dtype, device=x.device)
        weight = self.rule.step(ones * 0, ones, s, s_next, ones * 0)  # d x_next / d denoised
        return denoised + shift / weight


def guided_wrapper(models: GuidanceModels, config: GuidanceConfig, sampler: str,
                   settings: dict[str, Any]) -> Callable[[Denoiser, Tensor], Denoiser]:
    """A ``wrap(denoiser, sigmas)`` for :func:`gen.diffusion.samplers.generate_batch`."""
    rule = step_rule(sampler, settings)
    return lambda denoiser, sigmas: LowDensityGuidance(denoiser, models, config, sigmas, rule)


def generate_guided_batch(model: DiffusionModel, guidance: GuidanceModels, sampling: SamplingConfig,
                          guide: GuidanceConfig, seed: int, indices: list[int], labels: torch.Tensor) -> torch.Tensor:
    """Guided samples for global `indices` (uint8 NCHW): gen.diffusion.samplers.generate_batch with the
    denoiser wrapped by Algorithm 1's guidance."""
    if guidance.input == "xt+x0" and not model.meta.denoises_without_labels:
        raise ConfigError(f'{model.path} cannot denoise without labels (no null class); "xt+x0" guidance needs '
                          "x0_hat without labels (a model trained with --label-dropout)")
    wrap = guided_wrapper(guidance, guide, sampling.sampler, sampling.sampler_settings())
    return generate_batch(model, sampling, seed, indices, labels.to(model.device), wrap=wrap)
