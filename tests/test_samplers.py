"""Samplers on a Gaussian with its exact denoiser; DDPM steps against diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from tailforge.gen.core.noise import PerSampleNoise
from tailforge.gen.diffusion.denoiser import ClampDenoised, EpsDenoiser, UNetEpsModel
from tailforge.gen.diffusion.samplers import (
    ddpm_posterior_std,
    ddpm_step,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sampler_sigmas,
)
from tailforge.gen.diffusion.schedules import alphas_cumprod, karras_sigmas, spaced_timesteps
from tailforge.gen.models.unet import build_unet

MU, STD = 0.3, 0.5  # data distribution N(MU, STD^2) in every dimension


class GaussianEps(torch.nn.Module):
    """The exact epsilon predictor for x0 ~ N(MU, STD^2) under a DDPM schedule:
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab STD^2 + 1 - ab)."""

    def __init__(self, ac):
        super().__init__()
        self.ac = ac

    def forward(self, x_vp, t, labels=None):
        ab = self.ac[t.long()].view(-1, 1)
        return (1 - ab).sqrt() * (x_vp - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)


def exact_sigma_denoiser(x, sigma):
    """E[x0 | x0 + sigma n] for x0 ~ N(MU, STD^2)."""
    s = sigma.view(-1, 1)
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


@pytest.fixture(scope="module")
def gaussian_denoiser():
    return EpsDenoiser(GaussianEps(alphas_cumprod("linear")), alphas_cumprod("linear"))


def test_eps_denoiser_is_exact_on_schedule_sigmas(gaussian_denoiser):
    sigmas = gaussian_denoiser.train_sigmas[[0, 10, 250, 999]]
    x = torch.randn(4, 16) * 3
    torch.testing.assert_close(gaussian_denoiser(x, sigmas), exact_sigma_denoiser(x, sigmas), rtol=1e-4, atol=1e-4)
    assert gaussian_denoiser.sigma_to_t(sigmas).tolist() == [0.0, 10.0, 250.0, 999.0]


# Ancestral samplers plug E[x0 | x_t] into the posterior with a fixed variance, which is exact only
# as the step count grows (Ho et al. 2020, Sec. 3.2: beta_tilde and beta bound the true variance),
# so they run the full chain; DDIM and Euler are first-order (about 5 % low at 50 steps on this
# Gaussian, 1 % at 250), Heun second-order.
@pytest.mark.parametrize("name,settings,steps", [
    ("ddpm", {}, 1000), ("ddpm", {"variance": "large"}, 1000), ("ddim", {"eta": 0.0}, 250),
    ("ddim", {"eta": 1.0}, 1000), ("euler", {}, 250), ("heun", {}, 50)])
def test_sampler_reproduces_gaussian_moments(gaussian_denoiser, name, settings, steps):
    sigmas = sampler_sigmas(name, gaussian_denoiser, steps)
    n = 4000
    rng = torch.Generator().manual_seed(1)
    x = MU + math.sqrt(STD**2 + float(sigmas[0]) ** 2) * torch.randn(n, 16, generator=rng)
    out = get_sampler(name, **settings)(gaussian_denoiser, x, sigmas, rng=rng)
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - STD) / STD < 0.03, out.std().item()


def test_spaced_timesteps_match_diffusers():
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for steps in (1, 10, 50, 250, 1000):
        scheduler.set_timesteps(steps)
        assert spaced_timesteps(1000, steps).tolist() == scheduler.timesteps.tolist()
    leading = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
    leading.set_timesteps(50)
    assert spaced_timesteps(1000, 50, spacing="leading").tolist() == leading.timesteps.tolist()


@pytest.mark.parametrize("variance,clip", [("small", False), ("small", True), ("large", False)])
def test_ddpm_step_equals_diffusers(variance, clip):
    torch.manual_seed(0)
    unet = build_unet("tiny", image_size=8, channels=1, num_classes=10).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=clip,
                              variance_type="fixed_small" if variance == "small" else "fixed_large")
    scheduler.set_timesteps(50)
    denoiser = EpsDenoiser(UNetEpsModel(unet), scheduler.alphas_cumprod)
    wrapped = ClampDenoised(denoiser) if clip else denoiser
    labels = torch.arange(4)
    ts = scheduler.timesteps
    for i in (0, 10, 48, 49):  # first, middle, last noisy step, final step to 0
        t = int(ts[i])
        prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        ab = scheduler.alphas_cumprod[t]
        ab_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        x_vp = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            eps = unet(x_vp, torch.full((4,), t), class_labels=labels).sample
            expected = scheduler.step(eps, t, x_vp, generator=torch.Generator().manual_seed(i)).prev_sample
            sigma, sigma_next = denoiser.train_sigmas[t], (denoiser.train_sigmas[prev] if prev >= 0 else torch.tensor(0.0))
            x = x_vp / ab.sqrt()
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            ours = ddpm_step(x, wrapped(x, sigma, labels), sigma, sigma_next, noise, variance) * ab_prev.sqrt()
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=2e-4)


def test_ddim_eta_one_equals_ddpm_small():
    x, d = torch.randn(3, 5), torch.randn(3, 5)
    sigma, sigma_next, noise = torch.tensor(2.0), torch.tensor(0.7), torch.randn(3, 5)
    from tailforge.gen.diffusion.samplers import ddim_step
    torch.testing.assert_close(ddim_step(x, d, sigma, sigma_next, noise, eta=1.0), ddpm_step(x, d, sigma, sigma_next, noise))
    assert ddpm_posterior_std(sigma, torch.tensor(0.0)) == 0


def test_per_sample_noise_does_not_depend_on_the_batch(gaussian_denoiser):
    sigmas = sampler_sigmas("ddpm", gaussian_denoiser, 20)

    def run(indices):
        rng = PerSampleNoise(7, indices)
        x = sigmas[0] * rng.randn((6,))
        return sample_ddpm(gaussian_denoiser, x, sigmas, rng=rng)

    together = run(range(8))
    apart = torch.cat([run([0, 1, 2]), run([3]), run([4, 5, 6, 7])])
    torch.testing.assert_close(together, apart)
    assert not torch.allclose(run([0]), run([1]))
    assert not torch.allclose(PerSampleNoise(7, [0]).randn((6,)), PerSampleNoise(8, [0]).randn((6,)))


def test_karras_grid_endpoints_and_order():
    sigmas = karras_sigmas(0.01, 80.0, 10)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.01) and sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])


def test_truncated_grid_starts_at_t_max(gaussian_denoiser):
    sigmas = sampler_sigmas("ddim", gaussian_denoiser, 10, t_max=299)
    assert sigmas[0] == gaussian_denoiser.train_sigmas[299] and sigmas[-1] == 0 and len(sigmas) == 11


def test_ddim_is_deterministic_at_eta_zero(gaussian_denoiser):
    sigmas = sampler_sigmas("ddim", gaussian_denoiser, 10)
    x = torch.randn(5, 4) * sigmas[0]
    assert torch.equal(sample_ddim(gaussian_denoiser, x, sigmas), sample_ddim(gaussian_denoiser, x, sigmas))
