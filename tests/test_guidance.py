"""Low-density guidance (Sehwag et al. 2022 Algorithm 1): the wrapped samplers against a literal Algorithm 1
loop, the norm of the applied guidance, no guidance on the last step, DDIM, the three guidance inputs
(Sastry et al. 2023's denoise-augmented "xt+x0" against finite differences through the denoiser),
alpha = beta = 0 against the baseline bit for bit, guidance folders, shards."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

from tailforge.eval.stats import decode_bits
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.core.noise import PerSampleNoise
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.denoiser import ClampDenoised, EpsDenoiser
from tailforge.gen.diffusion.samplers import (
    balanced_labels,
    ddpm_posterior_std,
    ddpm_step,
    generate_batch,
    sample_ddim,
    sample_ddpm,
    sampler_sigmas,
)
from tailforge.gen.diffusion.schedules import alphas_cumprod
from tailforge.gen.jobs.config import BaselineConfig, LowDensityConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import BaselineSource, LowDensitySource
from tailforge.gen.methods.config import GuidanceConfig, guidance_in_chans
from tailforge.gen.methods.lowdensity import (
    GuidanceModels,
    GuidanceNet,
    LowDensityGuidance,
    fit_class_gaussians,
    generate_guided_batch,
    guidance_direction,
    guidance_net_input,
    hardness_matrix,
    loss_g1,
    loss_g2,
    noisy_net_input,
    normalize,
    step_rule,
)
from tailforge.gen.models.classifiers import create_classifier, embed
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.gen.models.guidance import load_guidance, save_guidance

MU, STD = 0.2, 0.4
TAU = 200.0  # hardness gaps of the random test nets stay well below 200 * 80 nats: Eq. 4/6 do not saturate


class GaussianEps(nn.Module):
    """Exact epsilon predictor for pixels x0 ~ N(MU, STD^2) (an exact denoiser, fast and smooth)."""

    def __init__(self, ac):
        super().__init__()
        self.ac = ac

    def forward(self, x_vp, t, labels=None):
        ab = self.ac[t.long()].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x_vp - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)


def make_net(input: str, num_classes: int, levels: torch.Tensor, seed: int) -> GuidanceNet:
    """A random-weight tinycnn with class Gaussians of its embeddings of random images."""
    torch.manual_seed(seed)
    net = create_classifier("tinycnn", num_classes=num_classes, in_chans=guidance_in_chans(input, 1)).eval()
    images = torch.rand(120, 1, 8, 8) * 2 - 1
    labels = torch.arange(120) % num_classes
    gaussians = []
    for sigma in levels.tolist():  # "xt+x0": the clean images stand in for x0_hat
        inputs = images if input == "x0" else guidance_net_input(input, images + sigma * torch.randn_like(images),
                                                                 sigma, images)
        gaussians.append(fit_class_gaussians(embed(net, inputs), labels, num_classes, "ledoit_wolf"))
    return GuidanceNet(net, gaussians, levels, input)


def make_models(input: str = "x0") -> GuidanceModels:
    """Random guidance nets: one level for "x0", three for "xt" and "xt+x0"."""
    levels = torch.zeros(1) if input == "x0" else torch.tensor([0.01, 1.0, 20.0])
    return GuidanceModels(make_net(input, 10, levels, 0), make_net(input, 2, levels, 1), {"guidance_hash": "test"})


@pytest.fixture(scope="module")
def denoiser():
    ac = alphas_cumprod("linear")
    return ClampDenoised(EpsDenoiser(GaussianEps(ac), ac))


@pytest.fixture(scope="module")
def models_x0():
    return make_models("x0")


def unit_grad(loss_fn, at):
    """Algorithm 1's Normalize(grad L), computed directly with autograd (the test's reference)."""
    at = at.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(at).sum(), at)
    return grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def reference_directions(models, image, sigma, labels, tau):
    """Normalized gradients of the exact losses of Eq. 4 and Eq. 6. Callers pick a tau at which their
    softmax does not saturate: the exact gradients then do not underflow (the sampler differentiates
    direction surrogates, which never do)."""
    cls, disc = models.classifier, models.discriminator
    n1 = unit_grad(lambda z: loss_g1(hardness_matrix(cls(z, sigma)[0], cls.gaussians_at(sigma)), labels, tau), image)
    n2 = unit_grad(lambda z: loss_g2(hardness_matrix(disc(z, sigma)[0], disc.gaussians_at(sigma)), tau), image)
    return n1, n2


def test_normalize_is_per_sample_and_keeps_zero():
    u = torch.randn(5, 1, 8, 8) * torch.tensor([0.001, 1, 10, 100, 0]).view(-1, 1, 1, 1)
    n = normalize(u)
    torch.testing.assert_close(n[:4].flatten(1).norm(dim=1), torch.ones(4))
    assert torch.equal(n[4], torch.zeros_like(n[4]))


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.0), (0.0, 0.7), (0.5, 0.5), (2.0, 1.0)])
def test_guided_ddpm_step_adds_sigma_times_the_normalized_gradients(denoiser, models_x0, alpha, beta):
    sigmas = sampler_sigmas("ddpm", denoiser, 10)
    sigma, sigma_next = sigmas[3], sigmas[4]
    config = GuidanceConfig(alpha=alpha, beta=beta, tau=TAU)
    guided = LowDensityGuidance(denoiser, models_x0, config, sigmas, step_rule("ddpm", {}))
    x = torch.randn(6, 1, 8, 8) * sigma
    labels = torch.arange(6)
    noise = torch.randn_like(x)
    denoised = denoiser(x, sigma.expand(6), labels)
    plain = ddpm_step(x, denoised, sigma, sigma_next, noise)
    applied = ddpm_step(x, guided(x, sigma.expand(6), labels), sigma, sigma_next, noise) - plain

    big_sigma = ddpm_posterior_std(sigma, sigma_next)
    n1, n2 = reference_directions(models_x0, denoised, 0.0, labels, TAU)  # x0 input: gradient at x0_hat
    torch.testing.assert_close(applied, big_sigma * (alpha * n1 + beta * n2), rtol=1e-3, atol=1e-5)
    if alpha == 0 or beta == 0:  # one term: the applied guidance has norm (alpha or beta) * Sigma exactly
        torch.testing.assert_close(applied.flatten(1).norm(dim=1), (alpha + beta) * big_sigma.expand(6), rtol=1e-4, atol=0)


def algorithm1_step(denoiser, models, config, x, sigma, sigma_next, labels, rng):
    """One step of Sehwag et al. 2022 Algorithm 1, literally, for the DDPM sampler in sigma-space."""
    denoised = denoiser(x, sigma.expand(len(x)), labels)
    if sigma_next == 0:  # t = 1: z = 0, s = 0
        return ddpm_step(x, denoised, sigma, sigma_next, torch.zeros_like(x))
    n1, n2 = reference_directions(models, denoised, 0.0, labels, config.tau)
    return ddpm_step(x, denoised, sigma, sigma_next, rng.randn_like(x)) \
        + ddpm_posterior_std(sigma, sigma_next) * (config.alpha * n1 + config.beta * n2)


def test_wrapped_ddpm_sampler_is_algorithm_1(denoiser, models_x0):
    """Every step the unchanged sample_ddpm takes with the wrapped denoiser is Algorithm 1's step
    from the same point with the same noise. (Whole trajectories are not compared: the random nets'
    ReLU and max-pool kinks turn float round-off into different directions after a few steps.)"""
    sigmas = sampler_sigmas("ddpm", denoiser, 6)
    config = GuidanceConfig(alpha=0.5, beta=0.5, tau=TAU)
    labels = torch.arange(3)
    x = sigmas[0] * PerSampleNoise(7, range(3)).randn((1, 8, 8))
    guided = LowDensityGuidance(denoiser, models_x0, config, sigmas, step_rule("ddpm", {}))
    xs = [x]
    out = sample_ddpm(guided, x, sigmas, labels=labels, rng=PerSampleNoise(7, range(3)),
                      callback=lambda info: xs.append(info["x"].clone()))
    rng = PerSampleNoise(7, range(3))
    for i in range(len(sigmas) - 1):
        expected = algorithm1_step(denoiser, models_x0, config, xs[i], sigmas[i], sigmas[i + 1], labels, rng)
        torch.testing.assert_close(xs[i + 1], expected, rtol=1e-4, atol=1e-4 * float(sigmas[i + 1]) + 1e-5)
    plain = sample_ddpm(denoiser, x, sigmas, labels=labels, rng=PerSampleNoise(7, range(3)))
    assert (out - plain).abs().max() > 1e-3


def test_no_guidance_on_the_last_step(denoiser, models_x0):
    sigmas = sampler_sigmas("ddpm", denoiser, 5)
    guided = LowDensityGuidance(denoiser, models_x0, GuidanceConfig(alpha=1.0, beta=1.0), sigmas, step_rule("ddpm", {}))
    x = torch.randn(3, 1, 8, 8) * sigmas[-2]
    labels = torch.arange(3)
    assert torch.equal(guided(x, sigmas[-2].expand(3), labels), denoiser(x, sigmas[-2].expand(3), labels))
    assert not torch.equal(guided(x, sigmas[-3].expand(3), labels), denoiser(x, sigmas[-3].expand(3), labels))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_guidance_is_scaled_by_the_ddpm_posterior_std_of_the_step(denoiser, models_x0, eta):
    sigmas = sampler_sigmas("ddim", denoiser, 10)
    sigma, sigma_next = sigmas[2], sigmas[3]
    rule = step_rule("ddim", {"eta": eta})
    guided = LowDensityGuidance(denoiser, models_x0, GuidanceConfig(alpha=0.5, beta=0.0), sigmas, rule)
    x, labels, noise = torch.randn(4, 1, 8, 8) * sigma, torch.arange(4), torch.randn(4, 1, 8, 8)
    plain = rule.step(x, denoiser(x, sigma.expand(4), labels), sigma, sigma_next, noise)
    applied = rule.step(x, guided(x, sigma.expand(4), labels), sigma, sigma_next, noise) - plain
    expected = 0.5 * ddpm_posterior_std(sigma, sigma_next, "small")
    assert expected > 0
    torch.testing.assert_close(applied.flatten(1).norm(dim=1), expected.expand(4), rtol=1e-4, atol=0)


def test_xt_guidance_takes_the_gradient_at_x_t_with_the_nearest_level(denoiser):
    models = make_models("xt")
    assert models.classifier.gaussians_at(torch.tensor(0.9)) is models.classifier.gaussians[1]
    assert models.classifier.gaussians_at(torch.tensor(500.0)) is models.classifier.gaussians[2]
    sigmas = sampler_sigmas("ddpm", denoiser, 10)
    sigma, sigma_next = sigmas[6], sigmas[7]
    guided = LowDensityGuidance(denoiser, models, GuidanceConfig(alpha=0.5, beta=0.5, tau=TAU), sigmas,
                                step_rule("ddpm", {}))
    x, labels, noise = torch.randn(4, 1, 8, 8) * sigma, torch.arange(4), torch.randn(4, 1, 8, 8)
    denoised = denoiser(x, sigma.expand(4), labels)
    applied = ddpm_step(x, guided(x, sigma.expand(4), labels), sigma, sigma_next, noise) \
        - ddpm_step(x, denoised, sigma, sigma_next, noise)
    n1, n2 = reference_directions(models, x, sigma, labels, TAU)
    torch.testing.assert_close(applied, ddpm_posterior_std(sigma, sigma_next) * 0.5 * (n1 + n2), rtol=1e-3, atol=1e-5)


def test_guidance_rejects_what_algorithm_1_does_not_cover(denoiser, models_x0):
    sigmas = sampler_sigmas("ddpm", denoiser, 5)
    guided = LowDensityGuidance(denoiser, models_x0, GuidanceConfig(), sigmas, step_rule("ddpm", {}))
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="not on its sampling grid"):
        guided(x, torch.full((2,), 3.3333), torch.arange(2))
    with pytest.raises(ConfigError, match="labels"):
        guided(x, sigmas[1].expand(2), None)
    with pytest.raises(ConfigError, match="ddpm or ddim"):
        step_rule("heun", {})
    with pytest.raises(ConfigError, match="alpha and beta"):
        GuidanceConfig(alpha=-1)


def test_direction_counts_guidance_evaluations(models_x0):
    models_x0.evals = 0
    guidance_direction(models_x0, torch.randn(3, 1, 8, 8), torch.tensor(0.0), torch.arange(3),
                       GuidanceConfig(alpha=0.5, beta=0.5, loss="softmax"))
    assert models_x0.evals == 6


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_alpha_beta_zero_reproduces_the_baseline_bit_for_bit(tiny_model_dir, models_x0, sampler, eta):
    model = load_diffusion_model(tiny_model_dir)
    sampling = SamplingConfig(sampler=sampler, steps=4, eta=eta)
    indices = [5, 6, 7, 8]
    labels = balanced_labels(indices, 10)
    baseline = generate_batch(model, sampling, 11, indices, labels)
    off = generate_guided_batch(model, models_x0, sampling, GuidanceConfig(alpha=0.0, beta=0.0), 11, indices, labels)
    assert torch.equal(off, baseline)
    # The same in float, through the plain sampler with per-sample noise (no uint8 rounding to hide a difference).
    den = ClampDenoised(model.denoiser)
    sigmas = sampler_sigmas(sampler, den, 4)
    x = sigmas[0] * PerSampleNoise(11, indices).randn((1, 8, 8))
    sample = functools.partial(sample_ddpm if sampler == "ddpm" else functools.partial(sample_ddim, eta=eta),
                               x=x, sigmas=sigmas, labels=labels)
    wrapped = LowDensityGuidance(den, models_x0, GuidanceConfig(alpha=0.0, beta=0.0), sigmas,
                                 step_rule(sampler, {"eta": eta}))
    assert torch.equal(sample(wrapped, rng=PerSampleNoise(11, indices)), sample(den, rng=PerSampleNoise(11, indices)))
    on = generate_guided_batch(model, models_x0, sampling, GuidanceConfig(alpha=0.5, beta=0.5), 11, indices, labels)
    assert not torch.equal(on, baseline)


def test_guidance_folder_round_trip(tmp_path, models_x0):
    info = save_guidance(tmp_path / "g", models_x0.classifier, {"model": "tinycnn", "num_classes": 10, "in_chans": 1},
                         models_x0.discriminator, {"model": "tinycnn", "num_classes": 2, "in_chans": 1}, {"note": 1})
    assert info["input"] == "x0" and info["note"] == 1 and len(info["guidance_hash"]) == 16
    loaded = load_guidance(tmp_path / "g")
    x, labels = torch.randn(3, 1, 8, 8), torch.arange(3)
    torch.testing.assert_close(loaded.sample_hardness(x, labels), models_x0.sample_hardness(x, labels))
    config = GuidanceConfig(alpha=0.3, beta=0.6)
    torch.testing.assert_close(guidance_direction(loaded, x, torch.tensor(0.0), labels, config),
                               guidance_direction(models_x0, x, torch.tensor(0.0), labels, config))
    (tmp_path / "g" / "guidance.json").unlink()
    with pytest.raises(Exception, match="guidance description"):
        load_guidance(tmp_path / "g")


@pytest.mark.parametrize("input", ["x0", "xt"])
def test_train_guidance_writes_a_loadable_folder(tmp_path, tiny_model_dir, input):
    from tailforge.train.config import GuidanceTrainConfig
    from tailforge.train.guidance import train_guidance

    config = GuidanceTrainConfig(dataset="digits?n=60", model=str(tiny_model_dir), input=input, epochs=1, levels=2,
                                 synthetic=SamplingConfig(sampler="ddim", steps=2))
    info = train_guidance(config, tmp_path / "g", progress=False)
    assert info["input"] == input and info["num_real"] == info["num_synthetic"] == 60
    assert len(info["classifier_test_accuracy"]) == len(info["level_sigmas"]) == (1 if input == "x0" else 2)
    check_test_correct(info, len(load_dataset("digits?n=60", "test")))
    models = load_guidance(tmp_path / "g")
    assert models.input == input and models.classifier.net.num_classes == 10 and models.discriminator.net.num_classes == 2
    assert len(models.classifier.gaussians) == len(info["level_sigmas"])
    assert json.loads((tmp_path / "g" / "classifier" / "classifier.json").read_text())["guidance_input"] == input


def test_lowdensity_shards_record_guidance_and_hardness(tmp_path, tiny_model_dir, models_x0):
    save_guidance(tmp_path / "g", models_x0.classifier, {"model": "tinycnn", "num_classes": 10, "in_chans": 1},
                  models_x0.discriminator, {"model": "tinycnn", "num_classes": 2, "in_chans": 1}, {})
    sampling = SamplingConfig(sampler="ddpm", steps=3)
    runs = {}
    for name, guide in (("ld", GuidanceConfig(alpha=0.5, beta=0.25)), ("off", GuidanceConfig(alpha=0.0, beta=0.0))):
        config = LowDensityConfig(model=str(tiny_model_dir), guidance=str(tmp_path / "g"), num=7, sampling=sampling,
                                  guide=guide, seed=2, shard_size=4, batch_size=3)
        run_job(tmp_path / name, config_dict(config), plan_shards(config.job, 7, 4, 2),
                functools.partial(LowDensitySource, config), actors=0, progress=False)
        runs[name] = list(iter_samples(tmp_path / name))
    base = BaselineConfig(model=str(tiny_model_dir), num=7, sampling=sampling, seed=2, shard_size=4, batch_size=3)
    run_job(tmp_path / "base", config_dict(base), plan_shards(base.job, 7, 4, 2),
            functools.partial(BaselineSource, base), actors=0, progress=False)
    baseline = list(iter_samples(tmp_path / "base"))
    assert [(s["image"] == b["image"]).all() for s, b in zip(runs["off"], baseline)] == [True] * 7
    loaded = load_guidance(tmp_path / "g")
    for sample in runs["ld"]:
        meta = sample["meta"]
        assert (meta["alpha"], meta["beta"], meta["guidance_input"], meta["guidance_loss"]) == (0.5, 0.25, "x0", "hardness")
        assert meta["guidance_classifier_sha256"] == loaded.info["classifier_sha256"]
        image = uint8_to_float(torch.from_numpy(sample["image"])[None])
        expected = loaded.sample_hardness(image, torch.tensor([sample["label"]]))
        assert meta["hardness"] == pytest.approx(float(expected), rel=1e-4, abs=1e-3)


def test_gen_lowdensity_cli_keeps_the_paper_defaults_for_options_left_out(tmp_path, tiny_model_dir, models_x0, capsys):
    from tailforge.cli import main

    save_guidance(tmp_path / "g", models_x0.classifier, {"model": "tinycnn", "num_classes": 10, "in_chans": 1},
                  models_x0.discriminator, {"model": "tinycnn", "num_classes": 2, "in_chans": 1}, {})
    common = ["gen", "lowdensity", "--model", str(tiny_model_dir), "--guidance", str(tmp_path / "g"), "--num", "2",
              "--steps", "2", "--actors", "0", "--quiet"]
    assert main([*common, "--alpha", "0.3", "--out", str(tmp_path / "s")]) == 0
    meta = next(iter_samples(tmp_path / "s"))["meta"]
    assert (meta["alpha"], meta["beta"], meta["tau"], meta["guidance_loss"]) == (0.3, 0.5, 1.0, "hardness")
    capsys.readouterr()
    assert main([*common, "--beta", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "alpha and beta must be >= 0" in err


def test_guidance_scale_by_variance_is_the_guided_diffusion_codes_vp_variance():
    """guided-diffusion adds variance * gradient to the VP-space mean; in sigma-space that shift is
    divided by sqrt(alpha_bar_next). diffusers' DDPMScheduler gives the VP posterior variance."""
    from diffusers import DDPMScheduler

    from tailforge.gen.diffusion.samplers import ddpm_posterior_std
    from tailforge.gen.diffusion.schedules import sigmas_from_alphas_cumprod
    from tailforge.gen.methods.lowdensity import guidance_scale

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alpha_bar = torch.cumprod(1 - scheduler.betas.double(), 0)  # float64 throughout
    sigmas = sigmas_from_alphas_cumprod(alpha_bar)
    ratios = []
    for t in (999, 500, 100, 10, 1):
        std = ddpm_posterior_std(sigmas[t], sigmas[t - 1])
        # the DDPM posterior variance (Ho et al. 2020 Eq. 7) in float64, and diffusers' (float32)
        beta = scheduler.betas.double()[t]
        variance_vp = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * beta
        assert float(scheduler._get_variance(t)) == pytest.approx(float(variance_vp), rel=1e-3)
        got = guidance_scale(std, sigmas[t - 1], "variance")
        assert float(got) == pytest.approx(float(variance_vp / alpha_bar[t - 1].sqrt()), rel=1e-9)
        assert guidance_scale(std, sigmas[t - 1], "std") is std
        ratios.append(float(std / got))
        assert ratios[-1] == pytest.approx(float(1 / variance_vp.sqrt()), rel=1e-9)  # the two differ by the VP std
    # the variance reading pushes about 7x less at the first step and over 100x less at the last
    assert ratios == sorted(ratios) and 7 < ratios[0] < 7.2 and ratios[-1] > 100
    with pytest.raises(ConfigError, match="scale"):
        guidance_scale(std, sigmas[0], "both")


def test_guidance_net_runs_the_classifier_it_was_given_with_batch_norms_folded():
    # GuidanceNet's passes run a copy with each batch norm folded into the convolution before it
    # (lowdensity.fold_batch_norms); with non-trivial running statistics and affine parameters its
    # embeddings, logits and input gradients are the classifier's own up to float round-off, and the
    # classifier itself (what a guidance folder saves) keeps its batch norms
    torch.manual_seed(3)
    net = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    guided = GuidanceNet(net, [], torch.zeros(1), "x0")
    x = (torch.rand(16, 1, 8, 8) * 2 - 1).requires_grad_(True)
    emb, logits = guided(x, 0.0)
    (grad,) = torch.autograd.grad(emb.sum(), x)
    ref_emb = net.forward_head(net.forward_features(x), pre_logits=True)
    (ref_grad,) = torch.autograd.grad(ref_emb.sum(), x)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in guided.net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in guided.inference_net.modules())


def check_test_correct(info, num_test):
    """guidance.json's per-image correctness of the embedding classifier: one bit string per level
    (the accuracy's keys), one bit per held-out test image, its mean the recorded accuracy."""
    correct, accuracy = info["classifier_test_correct"], info["classifier_test_accuracy"]
    assert correct.keys() == accuracy.keys()
    for key, bits in correct.items():
        assert len(bits) == num_test
        assert decode_bits(bits).mean() == pytest.approx(accuracy[key], abs=5e-5)


@pytest.fixture(scope="module")
def null_model_dir(tmp_path_factory):
    """tiny_model_dir's model with a null class (what label dropout trains): it denoises without labels."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
    from tailforge.gen.models.unet import build_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_null_model")
    save_diffusion_model(folder, build_unet("tiny", image_size=8, channels=1, num_classes=11),
                         DDPMScheduler(num_train_timesteps=1000),
                         ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789"),
                                   null_class=10, dataset="digits"))
    return folder


class Unconditional(nn.Module):
    """A smooth, label-free test denoiser with a non-diagonal Jacobian, recording each call's batch size
    (and refusing labels: "xt+x0" nets must see x0_hat without the generated class)."""

    sigma_min, sigma_max = 0.01, 80.0

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, labels=None):
        assert labels is None
        self.calls.append(len(x))
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(len(x)).view(-1, 1, 1, 1)
        return torch.tanh(x / (1 + s**2).sqrt() + 0.3 * x.roll(1, dims=-1))


def test_denoise_augmented_net_input_is_noisy_input_and_x0_hat_concatenated():
    x, x0_hat, sigma = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.tensor(0.7)
    got = guidance_net_input("xt+x0", x, sigma, x0_hat)
    assert got.shape == (4, guidance_in_chans("xt+x0", 3), 8, 8) == (4, 2 * 3 + 1, 8, 8)
    assert torch.equal(got, torch.cat([noisy_net_input(x, sigma), x0_hat], dim=1))
    assert torch.equal(guidance_net_input("xt", x, sigma, x0_hat), noisy_net_input(x, sigma))
    models = make_models("xt+x0")
    images = torch.randn(2, 1, 8, 8)
    assert models.classifier(images, sigma, images)[1].shape == (2, 10)
    with pytest.raises(ConfigError, match="x0_hat"):
        models.classifier(images, sigma)
    with pytest.raises(ConfigError, match="unknown guidance input"):
        guidance_in_chans("x0+xt", 1)


def test_xt_x0_guidance_differentiates_through_the_denoiser():
    models, den = make_models("xt+x0"), Unconditional()
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.tensor(1.0), torch.arange(4)
    config = GuidanceConfig(alpha=0.5, beta=0.5, tau=TAU)
    direction = guidance_direction(models, x, sigma, labels, config, den)
    assert den.calls == [8] and models.unet_evals == 8  # both losses' leaves, denoised as one batch
    detached = guidance_direction(models, x, sigma, labels, config, lambda z, s, labels=None: den(z, s).detach())
    assert (direction - detached).abs().max() > 1e-2
    guidance_direction(models, x, sigma, labels, GuidanceConfig(alpha=0.5, beta=0.0), den)
    assert den.calls[-1] == 4 and models.unet_evals == 8 + 8 + 4  # one loss: only its leaf is denoised
    with pytest.raises(ConfigError, match="denoiser"):
        guidance_direction(models, x, sigma, labels, config)


def test_xt_x0_guidance_direction_matches_finite_differences():
    """Normalize(grad L_g1) and Normalize(grad L_g2) of the exact losses (Eq. 4, Eq. 6) as functions of
    x_t, both net inputs depending on it, by central differences in float64 on a tiny case."""
    models, den = copy.deepcopy(make_models("xt+x0")).double(), Unconditional()
    x, labels = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.arange(2)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    cls, disc = models.classifier, models.discriminator
    losses = (lambda z, y: loss_g1(hardness_matrix(cls(z, sigma, den(z, sigma))[0], cls.gaussians_at(sigma)), y, TAU),
              lambda z, y: loss_g2(hardness_matrix(disc(z, sigma, den(z, sigma))[0], disc.gaussians_at(sigma)), TAU))
    # every one-pixel step of every sample as one batch (eval mode: each row's loss is its own)
    h, pixels = 1e-5, x[0].numel()
    steps = (h * torch.eye(pixels, dtype=x.dtype)).view(1, pixels, *x.shape[1:])
    rows = labels.repeat_interleave(pixels)
    units = [normalize(((loss((x.unsqueeze(1) + steps).flatten(0, 1), rows)
                         - loss((x.unsqueeze(1) - steps).flatten(0, 1), rows)) / (2 * h)).view_as(x))
             for loss in losses]
    config = GuidanceConfig(alpha=0.5, beta=0.7, tau=TAU)
    torch.testing.assert_close(guidance_direction(models, x, sigma, labels, config, den),
                               0.5 * units[0] + 0.7 * units[1], rtol=1e-5, atol=1e-7)


def test_xt_x0_guided_step_takes_the_gradient_at_x_t_through_the_unlabelled_denoiser(denoiser):
    models = make_models("xt+x0")
    sigmas = sampler_sigmas("ddpm", denoiser, 10)
    sigma, sigma_next = sigmas[6], sigmas[7]
    guided = LowDensityGuidance(denoiser, models, GuidanceConfig(alpha=0.5, beta=0.5, tau=TAU), sigmas,
                                step_rule("ddpm", {}))
    x, labels, noise = torch.randn(4, 1, 8, 8) * sigma, torch.arange(4), torch.randn(4, 1, 8, 8)
    applied = ddpm_step(x, guided(x, sigma.expand(4), labels), sigma, sigma_next, noise) \
        - ddpm_step(x, denoiser(x, sigma.expand(4), labels), sigma, sigma_next, noise)
    cls, disc = models.classifier, models.discriminator
    n1 = unit_grad(lambda z: loss_g1(hardness_matrix(cls(z, sigma, denoiser(z, sigma))[0], cls.gaussians_at(sigma)),
                                     labels, TAU), x)
    n2 = unit_grad(lambda z: loss_g2(hardness_matrix(disc(z, sigma, denoiser(z, sigma))[0], disc.gaussians_at(sigma)),
                                     TAU), x)
    torch.testing.assert_close(applied, ddpm_posterior_std(sigma, sigma_next) * 0.5 * (n1 + n2), rtol=1e-3, atol=1e-5)


def test_net_inputs_of_xt_and_xt_x0_share_the_noisy_images(denoiser):
    from tailforge.train.guidance import net_inputs

    test = load_dataset("digits?n=60", "test")
    xt, both = net_inputs(test, 0.5, "xt", 10_001), net_inputs(test, 0.5, "xt+x0", 10_001, denoiser)
    assert both.shape[1] == 3 and torch.equal(both[:, :2], xt)
    noisy = test.float_images() + 0.5 * torch.randn(test.float_images().shape,
                                                     generator=torch.Generator().manual_seed(10_001))
    torch.testing.assert_close(both[:, 2:], denoiser(noisy, torch.tensor(0.5)))


def test_train_guidance_xt_x0_writes_a_loadable_folder_that_guides(tmp_path, null_model_dir):
    from tailforge.train.config import GuidanceTrainConfig
    from tailforge.train.guidance import train_guidance

    config = GuidanceTrainConfig(dataset="digits?n=60", model=str(null_model_dir), input="xt+x0", epochs=1, levels=2,
                                 synthetic=SamplingConfig(sampler="ddim", steps=2))
    info = train_guidance(config, tmp_path / "g", progress=False)
    assert info["input"] == "xt+x0" and len(info["level_sigmas"]) == 2
    check_test_correct(info, len(load_dataset("digits?n=60", "test")))
    for name in ("classifier", "discriminator"):
        saved = json.loads((tmp_path / "g" / name / "classifier.json").read_text())
        assert (saved["in_chans"], saved["guidance_input"]) == (3, "xt+x0")
    models = load_guidance(tmp_path / "g")
    assert models.input == "xt+x0" and len(models.classifier.gaussians) == 2
    model = load_diffusion_model(null_model_dir)
    sampling, indices = SamplingConfig(sampler="ddpm", steps=3), [0, 1, 2]
    labels = balanced_labels(indices, 10)
    guide = GuidanceConfig(alpha=0.5, beta=0.5)
    first = generate_guided_batch(model, models, sampling, guide, 4, indices, labels)
    guided_steps = len(sampler_sigmas("ddpm", model.denoiser, 3)) - 2  # none on the last step
    assert models.unet_evals == guided_steps * 2 * len(indices)
    assert torch.equal(generate_guided_batch(model, models, sampling, guide, 4, indices, labels), first)
    assert not torch.equal(first, generate_batch(model, sampling, 4, indices, labels))
    assert models.sample_hardness(uint8_to_float(first), labels).isfinite().all()


def test_xt_x0_refuses_a_model_that_cannot_denoise_without_labels(tmp_path, tiny_model_dir):
    from tailforge.train.config import GuidanceTrainConfig
    from tailforge.train.guidance import train_guidance

    config = GuidanceTrainConfig(dataset="digits?n=60", model=str(tiny_model_dir), input="xt+x0", epochs=1, levels=2)
    with pytest.raises(ConfigError, match="cannot denoise without labels") as err:
        train_guidance(config, tmp_path / "g", progress=False)
    assert str(tiny_model_dir) in str(err.value) and len(str(err.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="cannot denoise without labels"):
        generate_guided_batch(load_diffusion_model(tiny_model_dir), make_models("xt+x0"), SamplingConfig(steps=2),
                              GuidanceConfig(), 0, [0], torch.tensor([0]))


def test_baseline_samples_are_drawn_once_per_process_for_the_same_model_and_settings(tiny_model_dir, monkeypatch):
    """The demo's three guidance folders share one set of discriminator samples: the second request for the
    same model, count, sampler and seed draws nothing and returns the same images, whatever the batch size."""
    import tailforge.train.guidance as guidance
    from tailforge.gen.models.diffusion import load_diffusion_model

    model = load_diffusion_model(tiny_model_dir)
    sampling = SamplingConfig(sampler="ddim", steps=2)
    calls = []
    real_generate = guidance.generate_batch
    monkeypatch.setattr(guidance, "generate_batch", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    first = guidance.baseline_samples(model, 12, sampling, seed=3, batch_size=5, progress=False)
    drawn = len(calls)
    again = guidance.baseline_samples(model, 12, sampling, seed=3, batch_size=12, progress=False)
    assert again is first and len(calls) == drawn == 3
    other = guidance.baseline_samples(model, 12, sampling, seed=4, progress=False)  # another seed: drawn anew
    assert len(calls) == drawn + 1 and not torch.equal(other.images, first.images)
    assert torch.equal(first.labels, other.labels)
