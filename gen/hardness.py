"""Hardness score and the low-density guidance losses of seed 000 (Sehwag et al., CVPR 2022).

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
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from torch import Tensor

from .errors import ConfigError

SHRINKAGE = ("auto", "ledoit_wolf", "none")


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

    def to(self, device: torch.device | str) -> "ClassGaussians":
        # fields read one by one: dataclasses.astuple deep-copies every tensor, which on each guided
        # step (hardness_matrix moves the Gaussians to the features' device) was 9 % of the guidance direction
        return ClassGaussians(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

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
    """Fit N(mu_y, Sigma_y) to the embeddings of each class (seed 000, Sec. 3.2.1).

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

    through the Cholesky factor: the Mahalanobis term is ||L_j^-1 (f - mu_j)||^2 and
    ln det Sigma_j = 2 sum ln diag L_j, which avoids forming an inverse.
    """
    g = gaussians.to(features.device)
    diff = (features.unsqueeze(0) - g.means.unsqueeze(1)).transpose(1, 2)  # [C, k, N]
    white = torch.linalg.solve_triangular(g.scale_tril.to(features.dtype), diff.to(features.dtype), upper=False)
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
