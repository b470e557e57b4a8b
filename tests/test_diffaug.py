"""DiffAug (Sastry et al. 2023 Eq. 3), its training loss, the in-process and Ray-served stages, DiffAug-Ensemble."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.diffusion.schedules import alphas_cumprod, sigma_at_step, sigmas_from_alphas_cumprod
from tailforge.gen.jobs.diffaug import make_diffaug_stage
from tailforge.gen.methods.diffaug import (
    ENSEMBLE_TIMES,
    DiffAugEnsemble,
    augment_images,
    batch_noise,
    diffaug,
    draw_times,
    load_diffaug_ensemble,
)
from tailforge.gen.models.classifiers import create_classifier
from tailforge.gen.models.diffusion import load_diffusion_model

BATCH, NUM_BATCHES, SEED = 10, 6, 11


class GaussianDenoiser(nn.Module):
    """The exact denoiser E[x0 | x] of data N(mu, s^2 I) under x = x0 + sigma eps (a Denoiser)."""

    def __init__(self, mu: float = 0.3, s: float = 0.5):
        super().__init__()
        self.mu, self.s = mu, s
        self.train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod("linear", 1000))
        self.sigma_min, self.sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])

    def forward(self, x, sigma, labels=None):
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


def digit_batches(num_batches=NUM_BATCHES, seed=SEED):
    data = load_dataset("digits", "train")
    images = data.float_images()
    return [{"images": images[i * BATCH:(i + 1) * BATCH], "labels": data.labels[i * BATCH:(i + 1) * BATCH],
             "index": i, "seed": seed} for i in range(num_batches)]


@pytest.fixture(scope="module")
def tiny_denoiser(tiny_model_dir):
    return load_diffusion_model(tiny_model_dir).denoiser


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The in-process stage's output on the digit batches: what every served run must reproduce.
    It runs in this process with 2 torch threads (an AugmentActor gets OMP_NUM_THREADS=1): the
    stage itself fixes the denoiser's thread count, and gives the process's count back."""
    batches = digit_batches()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outputs = list(make_diffaug_stage(str(tiny_model_dir), actors=0, seed=SEED)(batches))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for batch, out in zip(batches, outputs):  # the same batch objects come back, plus "augmented"
        assert out.keys() - batch.keys() == {"augmented"} and all(out[k] is batch[k] for k in batch)
    return outputs


def test_diffaug_at_t_zero_is_the_identity(tiny_denoiser):
    x0 = digit_batches(1)[0]["images"]
    noise = torch.randn_like(x0)
    labels = torch.arange(BATCH) % 10
    assert torch.equal(diffaug(tiny_denoiser, x0, torch.zeros(BATCH, dtype=torch.long), noise, labels), x0)
    t = torch.tensor([0, 500] * (BATCH // 2))
    out = diffaug(tiny_denoiser, x0, t, noise, labels)
    assert torch.equal(out[t == 0], x0[t == 0]) and not torch.allclose(out[t > 0], x0[t > 0], atol=0.05)


def test_diffaug_returns_the_denoised_estimate_of_x0():
    # Eq. 3 with an exact denoiser: x_hat = E[x0 | x_t] = mu + s^2 / (s^2 + sigma_t^2) (x_t - mu)
    denoiser = GaussianDenoiser()
    x0, noise = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t = torch.tensor([1, 10, 100, 300, 700, 999])
    sigma = sigma_at_step(denoiser.train_sigmas, t).view(-1, 1, 1, 1)
    x_t = x0 + sigma * noise
    expected = 0.3 + 0.25 / (0.25 + sigma**2) * (x_t - 0.3)
    assert torch.allclose(diffaug(denoiser, x0, t, noise), expected, atol=1e-6)


def test_times_and_noise_come_from_seed_batch_and_row():
    a, b = batch_noise(3, 7, 8), batch_noise(3, 7, 4)
    ta, tb = draw_times(a, 1000), draw_times(b, 1000)
    assert torch.equal(ta[:4], tb) and torch.equal(a.randn((2, 2))[:4], b.randn((2, 2)))  # row r is row r
    assert not torch.equal(draw_times(batch_noise(3, 8, 8), 1000), ta)  # another batch, other draws
    many = draw_times(batch_noise(0, 0, 4000), 1000)
    assert many.min() >= 0 and many.max() <= 999 and abs(float(many.float().mean()) - 499.5) < 20  # U{0..999}
    x0 = torch.zeros(8, 1, 4, 4)
    assert torch.equal(augment_images(GaussianDenoiser(), x0, None, 3, 7),
                       augment_images(GaussianDenoiser(), x0, None, 3, 7))


def test_in_process_stage_keeps_batches_and_adds_augmented(tiny_model_dir, reference):
    assert [b["index"] for b in reference] == list(range(NUM_BATCHES))
    for batch, out in zip(digit_batches(), reference):
        assert torch.equal(out["images"], batch["images"]) and out["seed"] == SEED
        assert out["augmented"].dtype == torch.float32 and out["augmented"].shape == batch["images"].shape
        assert out["augmented"].abs().max() <= 1
    again = list(make_diffaug_stage(str(tiny_model_dir), seed=None)(digit_batches(2)))  # seed None: the batch's
    assert all(torch.equal(a["augmented"], r["augmented"]) for a, r in zip(again, reference))
    other = next(make_diffaug_stage(str(tiny_model_dir), seed=SEED + 1)(digit_batches(1)))
    assert not torch.equal(other["augmented"], reference[0]["augmented"])


def counting(batches, pulled):
    for batch in batches:
        pulled.append(batch["index"])
        yield batch


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir):
    stage = make_diffaug_stage(str(tiny_model_dir), actors=2, seed=SEED, max_in_flight=3, actor_cpus=0.5)
    yield stage
    stage.close()


def assert_same_as_reference(outputs, reference):
    assert [b["index"] for b in outputs] == list(range(NUM_BATCHES))  # every batch once, in order
    for out, ref in zip(outputs, reference):
        assert torch.equal(out["labels"], ref["labels"])
        # bitwise: t and noise come from (seed, batch, row) and the denoiser runs with the same
        # thread count in the actor as in the in-process stage (DiffAugConfig.threads)
        assert torch.equal(out["augmented"], ref["augmented"])


def test_served_stage_agrees_with_in_process_and_bounds_in_flight(served, reference):
    pulled, outputs = [], []
    for out in served(counting(digit_batches(), pulled)):
        assert len(pulled) - len(outputs) <= served.max_in_flight  # backpressure
        outputs.append(out)
    assert_same_as_reference(outputs, reference)


def test_killing_an_augment_actor_mid_stream_loses_no_batch(served, reference):
    import ray

    outputs = []
    for out in served(digit_batches()):
        outputs.append(out)
        if len(outputs) == 2:
            ray.kill(served.pool[0], no_restart=True)  # gone for good: the stage replaces it
            ray.kill(served.pool[1], no_restart=False)  # Ray restarts it and retries its tasks
    assert_same_as_reference(outputs, reference)
    assert served.replaced >= 1


def test_ensemble_returns_log_mean_softmax_independent_of_batching():
    torch.manual_seed(0)
    classifier = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    images = digit_batches(1)[0]["images"]

    def point_mass(value, clip=True):
        # data at one value (s = 0): the exact denoiser returns it whatever the noise, so
        # DiffAug(x0, t) is x0 at t = 0 and the constant image at the nine other times of S
        return DiffAugEnsemble(classifier, GaussianDenoiser(mu=value, s=0.0), seed=4, clip_denoised=clip).eval()

    def expected(value):
        return (0.1 * classifier(images).softmax(1) + 0.9 * classifier(torch.full_like(images, value)).softmax(1)).log()

    with torch.no_grad():
        ensemble = point_mass(0.2)
        log_p, split = ensemble(images), torch.cat([ensemble(images[:5]), ensemble(images[5:])])
        assert torch.allclose(log_p, expected(0.2), atol=1e-5) and torch.allclose(log_p, split, atol=1e-6)
        # an estimate outside the data range is clamped to [-1, 1], as in the training-time stage
        assert torch.allclose(point_mass(3.0)(images), expected(1.0), atol=1e-5)
        assert torch.allclose(point_mass(3.0, clip=False)(images), expected(3.0), atol=1e-5)
        assert not torch.allclose(expected(1.0), expected(3.0), atol=1e-3)
        noisy = DiffAugEnsemble(classifier, GaussianDenoiser(), seed=4)
        noisy_p, noisy_split = noisy(images), torch.cat([noisy(images[:9]), noisy(images[9:])])
    assert ENSEMBLE_TIMES == (0, 50, 100, 150, 200, 250, 300, 350, 400, 450)
    assert torch.allclose(noisy_p.exp().sum(1), torch.ones(BATCH), atol=1e-5)  # log-probabilities
    assert torch.allclose(noisy_p, noisy_split, atol=1e-6)  # each image's noise is its own


def test_ensemble_refuses_a_class_conditional_model(tiny_model_dir):
    classifier = create_classifier("tinycnn", num_classes=10, in_chans=1)
    with pytest.raises(ConfigError, match="unconditional"):
        load_diffaug_ensemble(classifier, str(tiny_model_dir))
