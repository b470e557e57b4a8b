"""DiffAug (Sastry et al. 2023): diffuse-and-denoise augmentation, at train and test time.

DiffAug(x0, t) (Eq. 3) diffuses x0 to a random time t and applies one denoising step,
x_hat_t = x_t + sigma^2(t) s_theta(x_t, t), which is the denoiser's estimate of x0 (Tweedie). As in
the authors' released code it returns that one-step estimate D(x0 + sigma_t eps, sigma_t), with t
drawn uniformly from [0, T) per sample, and trains on the clean batch and its DiffAug batch
together: loss = CE(clean) + CE(augmented). The trainer computes that loss
(:func:`tailforge.train.classifier.classification_loss`, one forward pass over the concatenated
batch); this module supplies the augmented half through a stage.

DiffAug-Ensemble (:class:`DiffAugEnsemble`) averages the classifier's softmax over
t in S = {0, 50, ..., 450} (of T = 1000), t = 0 being the image itself.

t counts forward-diffusion steps (Ho et al. 2020), t = 0 the clean image: see
:func:`~tailforge.gen.diffusion.schedules.sigma_at_step`, shared with reconstruction (Yamaguchi & Fukuda 2023).

Reproducibility: every row's t and noise come from its own generator seeded by
(seed, batch index, row) (:func:`batch_noise`), never from torch's global generator or from which
process runs it; and the denoiser runs with a fixed number of torch CPU threads
(``DiffAugConfig.threads``) wherever the stage runs, because a CPU convolution's float sums are
split by thread and round differently with another count (Ray gives an actor OMP_NUM_THREADS=1,
a trainer has all cores), and x0_hat = x - sigma * eps_hat multiplies that rounding by sigma (up
to about 157 at t = T - 1). So the in-process stage and the actor pool
(:mod:`tailforge.gen.jobs.ray`) give bitwise-equal batches on the same hardware and libraries.

The augmented half reaches the trainer through the stage contract of gen/core/stage.py
(:func:`augment_batch` computes one batch's "augmented" tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.core.noise import PerSampleNoise, sample_seed
from tailforge.gen.diffusion.denoiser import ClampDenoised, Denoiser
from tailforge.gen.diffusion.schedules import sigma_at_step
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model

#: DiffAug-Ensemble's diffusion times (Sastry et al. 2023): S = {0, 50, ..., 450} of T = 1000.
ENSEMBLE_TIMES = tuple(range(0, 500, 50))


def diffaug(denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None = None) -> Tensor:
    """Eq. 3 of Sastry et al. 2023: the one-step denoised estimate of x0 from x_t = x0 + sigma_t * noise.

    ``t`` (int64 [B]) is each row's number of forward steps; rows with t = 0 are returned unchanged
    (sigma = 0: nothing to denoise), so DiffAug at t = 0 is exactly the identity.
    """
    sigma = sigma_at_step(denoiser.train_sigmas, t).to(x0)
    if not bool((sigma > 0).any()):
        return x0.clone()
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    with torch.no_grad():
        denoised = denoiser(x0 + s * noise, sigma, labels)
    return torch.where(s > 0, denoised, x0)


def batch_noise(seed: int, batch_index: int, rows: int) -> PerSampleNoise:
    """Row r of batch `batch_index` gets a generator seeded by (seed, batch_index, r): the batch's
    own seed sample_seed(seed, batch_index), then one stream per row from it."""
    return PerSampleNoise(sample_seed(seed, batch_index), range(rows))


def draw_times(rng: PerSampleNoise, num_train_timesteps: int) -> Tensor:
    """One t per row, uniform on {0, ..., T - 1} (the released code's t ~ U[0, T)), from the row's generator."""
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in rng.generators])


def augment_images(denoiser: Denoiser, images: Tensor, labels: Tensor | None, seed: int,
                   batch_index: int) -> Tensor:
    """DiffAug of one batch: each row's t, then its noise, from the row's (seed, batch, row) generator."""
    rng = batch_noise(seed, batch_index, len(images))
    t = draw_times(rng, len(denoiser.train_sigmas))
    return diffaug(denoiser, images, t, rng.randn_like(images), labels)


@dataclasses.dataclass(frozen=True)
class DiffAugConfig:
    """DiffAug served to a trainer; copied into the trainer's config."""

    model: str  # diffusion model folder (unconditional or with a null class; else conditioned on the batch labels)
    seed: int | None = None  # per-sample seed; None uses each batch's "seed" (the run seed)
    clip_denoised: bool = True  # clamp the denoised estimate to the data range [-1, 1]
    threads: int = 1  # torch CPU threads for the denoiser, the same in every process (bitwise-equal results)

    def __post_init__(self):
        if self.threads < 1:
            raise ConfigError(f"DiffAug threads must be >= 1, got {self.threads}")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, then restore the process's count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_denoiser(config: DiffAugConfig, device: str | torch.device) -> tuple[Denoiser, DiffusionModel]:
    model = load_diffusion_model(config.model, device)
    denoiser = ClampDenoised(model.denoiser) if config.clip_denoised else model.denoiser
    return denoiser, model


def augment_batch(denoiser: Denoiser, model: DiffusionModel, config: DiffAugConfig, images: Tensor, labels: Tensor,
                  batch_index: int, batch_seed: int) -> Tensor:
    """The stage's work on one batch, the same in-process and in an AugmentActor (with the same
    thread count, ``config.threads``); returns CPU float32."""
    device = model.device
    seed = batch_seed if config.seed is None else config.seed
    # the paper's DiffAug is unconditional; a conditional model without a null class sees the batch labels
    labels = None if model.meta.denoises_without_labels else labels.to(device)
    with torch_threads(config.threads):
        out = augment_images(denoiser, images.to(device=device, dtype=torch.float32), labels, seed, batch_index)
    return out.float().cpu()


def image_index(image: Tensor) -> int:
    """A 56-bit number from an image's bytes: the ensemble seeds each image's noise by
    (seed, image_index), so a prediction does not depend on the batch an evaluator put it in."""
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


class DiffAugEnsemble(nn.Module):
    """DiffAug-Ensemble (Sastry et al. 2023): p(y | x0) = mean over t in S of p_phi(y | DiffAug(x0, t)).

    An nn.Module from images ([-1, 1] or uint8 NCHW) to **log-probabilities** log p(y | x0): the
    ensemble is a mean of softmax outputs, and its log is returned so that every evaluator that
    takes logits (argmax, softmax, cross-entropy, ECE, MSP) works unchanged, since
    softmax(log p) = p. Logit-space scores (energy, MaxLogit) then score the averaged
    probabilities, and feature-based detectors (ReAct, ASH, Mahalanobis) need the wrapped
    ``classifier`` itself. The denoiser must be unconditional (test labels are unknown).
    Each image's noise comes from a generator seeded by (seed, a hash of the image), so results
    do not depend on batching.
    """

    def __init__(self, classifier: nn.Module, denoiser: Denoiser, times: Sequence[int] = ENSEMBLE_TIMES, seed: int = 0,
                 clip_denoised: bool = True):
        super().__init__()
        if not times:
            raise ConfigError("DiffAug-Ensemble needs at least one diffusion time")
        self.classifier = classifier
        # clamped to [-1, 1] like the training-time stage (DiffAugConfig.clip_denoised), so the
        # classifier sees the same kind of input at test time as in training
        self.denoiser = ClampDenoised(denoiser) if clip_denoised else denoiser
        self.times, self.seed = tuple(int(t) for t in times), int(seed)
        sigma_at_step(denoiser.train_sigmas, torch.tensor(self.times))  # validates the times

    def forward(self, images: Tensor) -> Tensor:
        x0 = uint8_to_float(images) if images.dtype == torch.uint8 else images
        rng = PerSampleNoise(self.seed, [image_index(row) for row in x0])
        probs = 0.0
        for t in self.times:
            augmented = diffaug(self.denoiser, x0, torch.full((len(x0),), t, dtype=torch.long), rng.randn_like(x0))
            probs = probs + self.classifier(augmented).softmax(1)
        # clamped so that a probability that underflowed to 0 gives a finite log
        return (probs / len(self.times)).clamp_min(torch.finfo(x0.dtype).tiny).log()


def load_diffaug_ensemble(classifier: nn.Module, model_dir: str, *, seed: int = 0, clip_denoised: bool = True,
                          times: Sequence[int] = ENSEMBLE_TIMES) -> DiffAugEnsemble:
    """DiffAug-Ensemble of `classifier` with the unconditional diffusion model in `model_dir`,
    on the classifier's device."""
    model = load_diffusion_model(model_dir, next(classifier.parameters()).device)
    if not model.meta.denoises_without_labels:
        raise ConfigError(f"{model_dir} is a class-conditional model without a null class; DiffAug-Ensemble runs at "
                          "test time without labels and needs an unconditional one (tailforge train diffusion "
                          "--unconditional, or --label-dropout P for one model that serves both)")
    return DiffAugEnsemble(classifier, model.denoiser, times, seed, clip_denoised).eval()
