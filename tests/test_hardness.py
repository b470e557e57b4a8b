"""Hardness (Sehwag et al. 2022 Eq. 3) against direct Gaussian log-densities; the guidance losses (Eq. 4, 6)
against hand-written formulas; class Gaussians against numpy / scikit-learn estimates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf
from torch.distributions import MultivariateNormal

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.methods.lowdensity import (
    ClassGaussians,
    direction_surrogate,
    fit_class_gaussians,
    hardness,
    hardness_matrix,
    loss_g1,
    loss_g1_softmax,
    loss_g2,
    loss_g2_softmax,
)

C, K = 3, 6


def clustered(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated Gaussian clusters, one per class, in K dimensions."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c in range(C):
        mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
        feats.append(torch.randn(n_per_class, K, generator=g) @ mix + 3 * c)
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(feats), torch.cat(labels)


def test_hardness_is_the_negative_multivariate_normal_log_density():
    feats, labels = clustered(40)
    g = fit_class_gaussians(feats, labels, C, "none")
    queries = torch.randn(25, K) * 2 + 1
    covs = g.scale_tril @ g.scale_tril.transpose(1, 2)
    H = hardness_matrix(queries, g)
    for c in range(C):
        torch_ref = -MultivariateNormal(g.means[c].double(), scale_tril=g.scale_tril[c].double()).log_prob(queries.double())
        scipy_ref = -multivariate_normal(g.means[c].numpy(), covs[c].double().numpy()).logpdf(queries.numpy())
        torch.testing.assert_close(H[:, c].double(), torch_ref, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(H[:, c].double().numpy(), scipy_ref, rtol=1e-4, atol=1e-3)
    y = torch.randint(0, C, (25,))
    torch.testing.assert_close(hardness(queries, y, g), H[torch.arange(25), y])


def test_sample_covariance_when_well_posed_and_ledoit_wolf_otherwise():
    feats, labels = clustered(40)
    g = fit_class_gaussians(feats, labels, C, "auto")
    assert g.shrinkage.tolist() == [0.0] * C and g.counts.tolist() == [40] * C
    cov0 = np.cov(feats[labels == 0].numpy(), rowvar=False, ddof=1)
    np.testing.assert_allclose((g.scale_tril[0] @ g.scale_tril[0].T).numpy(), cov0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.means[0].numpy(), feats[labels == 0].mean(0).numpy(), rtol=1e-5, atol=1e-5)

    few, few_labels = clustered(4)  # 4 samples per class in 6 dimensions: the sample covariance is singular
    with pytest.raises(ConfigError, match="singular"):
        fit_class_gaussians(few, few_labels, C, "none")
    g = fit_class_gaussians(few, few_labels, C, "auto")
    lw = LedoitWolf().fit(few[few_labels == 1].double().numpy())
    np.testing.assert_allclose((g.scale_tril[1] @ g.scale_tril[1].T).numpy(), lw.covariance_, rtol=1e-4, atol=1e-5)
    assert g.shrinkage[1].item() == pytest.approx(lw.shrinkage_, rel=1e-5)


def test_a_dead_feature_makes_auto_shrink_even_with_many_samples():
    feats, labels = clustered(40)
    feats[:, 2] = 0.0  # a ReLU unit that never fires: zero variance
    g = fit_class_gaussians(feats, labels, C, "auto")
    assert (g.shrinkage > 0).all()
    assert torch.isfinite(hardness_matrix(feats, g)).all()


def test_gaussians_round_trip_through_their_state():
    feats, labels = clustered(20)
    g = fit_class_gaussians(feats, labels, C)
    back = ClassGaussians.from_state(g.state("cls.level0"), "cls.level0")
    assert all(torch.equal(a, b) for a, b in zip(g.__dict__.values(), back.__dict__.values()))
    with pytest.raises(ConfigError, match="lack"):
        ClassGaussians.from_state({}, "cls.level0")


def test_loss_g1_is_the_log_softmax_of_hardness_over_tau():
    H = torch.tensor([[1.0, 5.0, 2.0], [10.0, -3.0, 0.5]])
    y = torch.tensor([0, 2])
    for tau in (0.5, 4.0):
        expected = torch.tensor([H[0, 0] / tau - torch.logsumexp(H[0] / tau, 0),
                                 H[1, 2] / tau - torch.logsumexp(H[1] / tau, 0)])
        torch.testing.assert_close(loss_g1(H, y, tau), expected)
    with pytest.raises(ConfigError, match="tau"):
        loss_g1(H, y, 0.0)


def test_loss_g2_favours_a_low_real_hardness():
    Hd = torch.tensor([[4.0, 1.0], [1.0, 4.0]])  # row 0: looks real (low H' under class 1)
    expected = -(Hd[:, 1] - torch.logsumexp(Hd, 1))
    torch.testing.assert_close(loss_g2(Hd, 1.0), expected)
    assert loss_g2(Hd, 1.0)[0] > loss_g2(Hd, 1.0)[1]
    logits = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    torch.testing.assert_close(loss_g2_softmax(logits, 2.0), torch.log_softmax(logits / 2.0, 1)[:, 1])


def test_softmax_variant_has_the_direction_of_minus_the_class_probability():
    """L_g1's probability variant: -log p(y|x) and -p(y|x) have the same normalized gradient."""
    x = torch.randn(4, 5, requires_grad=True)
    weight = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1])
    (g_log,) = torch.autograd.grad(loss_g1_softmax(x @ weight, y, 1.5).sum(), x)
    p = torch.softmax(x @ weight / 1.5, 1)[torch.arange(4), y]
    (g_p,) = torch.autograd.grad((-p).sum(), x)
    torch.testing.assert_close(g_log / g_log.norm(dim=1, keepdim=True), g_p / g_p.norm(dim=1, keepdim=True))


def unit_grads(fn, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g / g.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("name,exact,target", [
    ("g1", lambda s, y, tau: loss_g1(s, y, tau), "labels"),
    ("g1_softmax", lambda s, y, tau: loss_g1_softmax(s, y, tau), "labels"),
    ("g2", lambda s, y, tau: loss_g2(s, tau), 1),
    ("g2_softmax", lambda s, y, tau: loss_g2_softmax(s, tau), 1)])
def test_direction_surrogates_have_the_losses_normalized_gradients(name, exact, target):
    """Algorithm 1 uses Normalize(grad L): the surrogate must give exactly that direction where the
    loss is not saturated (float64 here), and still a direction where the loss's gradient underflows."""
    torch.manual_seed(0)
    classes = 5 if name.startswith("g1") else 2
    x = torch.randn(6, 4, dtype=torch.float64)
    weight = torch.randn(4, classes, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (6,))
    tgt = y if target == "labels" else target
    for tau in (0.7, 5.0):
        torch.testing.assert_close(unit_grads(lambda z: direction_surrogate(name, z @ weight, tgt, tau), x),
                                   unit_grads(lambda z: exact(z @ weight, y, tau), x))
    # Saturated in float32 (score gaps of thousands): the exact gradient vanishes for some rows.
    big = (x.float() * 1000).requires_grad_(True)
    w32 = weight.float()
    (g_exact,) = torch.autograd.grad(exact(big @ w32, y, 1.0).sum(), big)
    (g_sur,) = torch.autograd.grad(direction_surrogate(name, big @ w32, tgt, 1.0).sum(), big)
    assert (g_exact.norm(dim=1) == 0).any() and (g_sur.norm(dim=1) > 0).all()
