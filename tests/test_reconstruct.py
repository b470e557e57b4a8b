"""Real-sample reconstruction (Yamaguchi & Fukuda 2023 Algorithm 1) and output entropy (Yamaguchi & Fukuda 2023 Eq. 4)."""

from __future__ import annotations

import functools

import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from tailforge.eval.entropy import entropy_report, mean_output_entropy, output_entropy
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import plan_shards
from tailforge.gen.data.shards.read import iter_samples
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.diffusion.schedules import alphas_cumprod, sigma_at_step
from tailforge.gen.jobs.config import ReconstructConfig
from tailforge.gen.jobs.runner import run_job
from tailforge.gen.jobs.sources import ReconstructSource, shard_set_name
from tailforge.gen.methods.reconstruct import chain_steps, t_re_steps
from tailforge.gen.models.diffusion import load_diffusion_model

DATASET = "digits?n=12"


def test_sigma_at_step_is_ddpm_forward_process():
    # x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. Eq. 4) is x0 + sigma_t eps after dividing by
    # sqrt(ab_t): ab_t = 1 / (1 + sigma_t^2); t = 0 is the clean image (sigma 0)
    ab = alphas_cumprod("linear", 1000).double()
    train_sigmas = ((1 - ab) / ab).sqrt().float()
    t = torch.tensor([0, 1, 300, 1000])
    sigma = sigma_at_step(train_sigmas, t).double()
    assert sigma[0] == 0
    assert torch.allclose(1 / (1 + sigma[1:] ** 2), ab[t[1:] - 1], rtol=1e-5)
    with pytest.raises(ConfigError):
        sigma_at_step(train_sigmas, torch.tensor([1001]))


def test_t_re_fractions_and_chain_steps():
    assert [t_re_steps(f, 1000) for f in (0, 0.001, 0.3, 1.0)] == [0, 1, 300, 1000]
    assert [t_re_steps(f, 100) for f in (0.3, 0.5)] == [30, 50]
    assert [chain_steps(250, f, t_re_steps(f, 1000)) for f in (0.001, 0.3, 0.7, 1.0)] == [1, 75, 175, 250]
    assert [shard_set_name(f) for f in (0, 0.3, 1.0, 0.125)] == ["t_re_0", "t_re_0p3", "t_re_1", "t_re_0p125"]
    with pytest.raises(ConfigError):
        t_re_steps(1.5, 1000)


def run_reconstruction(model_dir, out, t_re, sampling=SamplingConfig(steps=10), seed=5):
    config = ReconstructConfig(model=str(model_dir), dataset=DATASET, t_re=t_re, sampling=sampling, seed=seed,
                               job=f"reconstruct_{shard_set_name(t_re)}", shard_size=6, batch_size=6)
    specs = plan_shards(config.job, 12, config.shard_size, config.seed)
    run_job(out, config_dict(config), specs, functools.partial(ReconstructSource, config), actors=0, progress=False)
    return load_dataset(f"shards:{out}", "train"), list(iter_samples(out))


def test_t_re_zero_is_the_real_data(tiny_model_dir, tmp_path):
    source = load_dataset(DATASET, "train")
    data, samples = run_reconstruction(tiny_model_dir, tmp_path, 0.0)
    assert torch.equal(data.images, source.images) and torch.equal(data.labels, source.labels)
    assert [s["meta"]["source_key"] for s in samples] == source.keys
    assert all(s["meta"]["t"] == 0 and s["meta"]["chain_steps"] == 0 for s in samples)


def test_tiny_t_re_returns_the_input_within_tolerance(tiny_model_dir, tmp_path):
    # t_re = 0.001 of T = 1000 is one forward step (sigma = 0.01) and one denoising step back: even a
    # random-weight network moves each pixel by only sigma * eps_hat, a few uint8 levels at most
    source = load_dataset(DATASET, "train")
    data, samples = run_reconstruction(tiny_model_dir, tmp_path, 0.001)
    diff = (data.images.float() - source.images.float()).abs()
    assert diff.max() <= 8 and diff.mean() < 2
    assert torch.equal(data.labels, source.labels)
    meta = samples[3]["meta"]
    assert meta["source_key"] == source.keys[3] and meta["t_re"] == 0.001 and meta["t"] == 1
    assert meta["kind"] == "reconstruct" and meta["label"] == int(source.labels[3]) and meta["chain_steps"] == 1


def test_larger_t_re_moves_further_from_the_input(tiny_model_dir, tmp_path):
    source = load_dataset(DATASET, "train").images.float()
    distances = [float((run_reconstruction(tiny_model_dir, tmp_path / str(f), f)[0].images.float() - source).abs().mean())
                 for f in (0.001, 0.1, 1.0)]
    assert distances[0] < distances[1] < distances[2]


def test_t_re_one_is_full_generation(tiny_model_dir, tmp_path):
    # t_re = 1 starts from x0 + sigma_max * eps with sigma_max ~ 157: the source image weighs 1/157 of
    # the noise, so the chain ends where plain generation from sigma_max * eps (same noise) ends
    sampling = SamplingConfig(sampler="ddim", steps=5)
    data, _ = run_reconstruction(tiny_model_dir, tmp_path, 1.0, sampling=sampling, seed=5)
    generated = generate_batch(load_diffusion_model(tiny_model_dir), sampling, 5, list(range(12)), data.labels)
    assert (data.images.float() - generated.float()).abs().mean() < 3


def test_output_entropy_matches_scipy():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3
    expected = torch.tensor([scipy_entropy(p) for p in logits.softmax(1).double().numpy()])
    assert torch.allclose(output_entropy(logits).double(), expected, atol=1e-5)
    assert mean_output_entropy(logits) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_output_entropy_limits_and_report():
    logits = torch.tensor([[0.0] * 4, [1e4, 0, 0, 0], [0, 1e4, 0, 0]])
    h = output_entropy(logits)
    assert h[0] == pytest.approx(float(torch.log(torch.tensor(4.0))), rel=1e-6) and h[1] == 0 and not h.isnan().any()
    report = entropy_report(logits, torch.tensor([0, 0, 3]), 4)
    assert report["n"] == 3 and report["top1"] == pytest.approx(2 / 3)
    assert report["per_class_mean_entropy"][0] == pytest.approx(float(h[:2].mean()))
    assert report["per_class_mean_entropy"][1] is None and report["per_class_mean_entropy"][3] == 0
