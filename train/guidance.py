"""`tailforge train guidance`: the two guidance models of Sehwag et al. 2022 (Sec. 3.2, 4).

1. An embedding classifier on the real training split, with one Gaussian per class of its
   embeddings (Eq. 3; Ledoit-Wolf shrinkage where the sample covariance is singular).
2. A real-vs-synthetic discriminator trained on the real training split (class 1) and an equal
   number of baseline samples of the diffusion model (class 0; Sec. 4: "we first uniformly sample
   synthetic images equal to the size of the training dataset"), with its own class Gaussians
   (H' of Eq. 6).

``input`` decides what both networks see while sampling (gen.methods.lowdensity): "x0" trains plain
classifiers on clean images (they score x0_hat); "xt" trains timestep-aware classifiers on images
diffused to a uniformly drawn timestep (Dhariwal & Nichol 2021's noisy classifiers; the paper's
classifiers are "conditioned on the diffusion process timestep") and fits the class Gaussians
separately at ``levels`` noise levels. "xt+x0" trains Sastry et al. 2023's denoise-augmented
(DA) classifiers: as "xt", with every noisy batch also given its denoised estimate x0_hat from the
diffusion model without labels (its null class, so a model trained with label dropout), under
no_grad, as extra input channels; they report DA-classifiers more accurate on noisy inputs than
noisy ("xt") classifiers. The held-out noise of each level is the same function of (seed, level)
for every input, and guidance.json records, per level, which held-out images the embedding
classifier got right (``classifier_test_correct``, eval.stats.encode_bits), so two folders of the
same seed can be compared image by image (a paired bootstrap). Everything goes into one folder
(gen.models.guidance.save_guidance).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tailforge.eval.stats import encode_bits
from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import DatasetInfo, LabeledImages, load_dataset
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.denoiser import ClampDenoised, Denoiser
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.methods.config import guidance_in_chans
from tailforge.gen.methods.lowdensity import GuidanceNet, fit_class_gaussians, guidance_net_input
from tailforge.gen.models.classifiers import create_classifier, embed, predict_logits
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model
from tailforge.gen.models.guidance import save_guidance
from tailforge.train.classifier import fit_classifier
from tailforge.train.config import ClassifierTrainConfig, GuidanceTrainConfig
from tailforge.train.run_folder import open_log

SYNTHETIC, REAL = 0, 1  # discriminator classes (Eq. 6: class one is real)


#: baseline samples already drawn in this process, by what they depend on (model hash, count, sampler, seed):
#: the demo trains three guidance folders on one model (x0, noisy and DA nets), and each would otherwise draw
#: the same discriminator samples again (on Fashion-MNIST's CPU preset, 10,000 samples of 20 steps each)
_BASELINE_SAMPLES: dict[tuple, LabeledImages] = {}


def baseline_samples(model: DiffusionModel, num: int, sampling: SamplingConfig, seed: int, batch_size: int = 256,
                     progress: bool = True) -> LabeledImages:
    """`num` class-balanced baseline samples (uint8), sample i seeded by (seed, i) as in a baseline job (so
    the same samples whatever `batch_size`); drawn once per process for the same model, count, sampler and seed."""
    key = (model.model_hash, num, sampling, seed)
    if key not in _BASELINE_SAMPLES:
        _BASELINE_SAMPLES.clear()  # one set at a time: a later model's samples replace an earlier one's
        _BASELINE_SAMPLES[key] = _draw_baseline_samples(model, num, sampling, seed, batch_size, progress)
    return _BASELINE_SAMPLES[key]


def _draw_baseline_samples(model: DiffusionModel, num: int, sampling: SamplingConfig, seed: int, batch_size: int,
                           progress: bool) -> LabeledImages:
    meta = model.meta
    if meta.num_classes is None:
        raise ConfigError(f"{model.path} is unconditional; guidance needs a class-conditional model")
    batches = []
    for first in tqdm(range(0, num, batch_size), desc="baseline samples", unit="batch", disable=not progress):
        indices = list(range(first, min(first + batch_size, num)))
        batches.append(generate_batch(model, sampling, seed, indices, balanced_labels(indices, meta.num_classes)))
    info = DatasetInfo(spec=f"baseline:{model.path}", image_size=meta.image_size, channels=meta.channels,
                       num_classes=meta.num_classes, class_names=meta.class_names, flip_augment=False)
    return LabeledImages(images=torch.cat(batches), labels=balanced_labels(range(num), meta.num_classes),
                         keys=[f"baseline-{i:09d}" for i in range(num)], info=info, split="train")


def real_vs_synthetic(real: LabeledImages, synthetic: LabeledImages, holdout: float, seed: int,
                      ) -> tuple[LabeledImages, LabeledImages]:
    """The discriminator's data (real = 1, synthetic = 0), split into training and held-out parts
    with the same real/synthetic proportions."""
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise ConfigError(f"real images {tuple(real.images.shape[1:])} and synthetic images "
                          f"{tuple(synthetic.images.shape[1:])} differ in shape")
    info = dataclasses.replace(real.info, spec="real-vs-synthetic", num_classes=2, class_names=("synthetic", "real"))
    both = LabeledImages(images=torch.cat([real.images, synthetic.images]),
                         labels=torch.cat([torch.full((len(real),), REAL), torch.full((len(synthetic),), SYNTHETIC)]),
                         keys=real.keys + synthetic.keys, info=info, split="train")
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(both.labels.numpy() == c))[:round(holdout * n)]
                           for c, n in ((REAL, len(real)), (SYNTHETIC, len(synthetic)))])
    keep = np.setdiff1d(np.arange(len(both)), held)
    return both.subset(keep), dataclasses.replace(both.subset(np.sort(held)), split="test")


def noise_levels(train_sigmas: Tensor, levels: int) -> Tensor:
    """`levels` sigmas at evenly spaced trained timesteps, t = 0 .. T-1 (ascending)."""
    t = torch.linspace(0, len(train_sigmas) - 1, levels).round().long()
    return train_sigmas.cpu()[t]


def denoised_estimates(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, batch_size: int = 256) -> Tensor:
    """x0_hat of noisy images `x` (sigma-space, at `sigma`: a scalar or one per row) from `denoiser`
    without labels, under no_grad, in batches on the denoiser's device; returned on the CPU."""
    device = denoiser.train_sigmas.device
    sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(len(x))
    with torch.no_grad():
        return torch.cat([denoiser(x[i:i + batch_size].to(device), sigma[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(x), batch_size)])


def fit_noisy_classifier(name: str, data: LabeledImages, train_sigmas: Tensor, config: GuidanceTrainConfig, *,
                         denoiser: Denoiser | None = None, device: str = "cpu", progress: bool = True,
                         log_path: Path | None = None) -> nn.Module:
    """A timestep-aware classifier (input "xt" or "xt+x0"): each step draws a batch of images and, per
    image, a timestep t ~ U{0, T-1}; the network sees x0 + sigma_t * eps through
    gen.methods.lowdensity.guidance_net_input (noise-level channel; for "xt+x0" also `denoiser`'s
    x0_hat of it, without labels, under no_grad: the random draws are those of "xt"). AdamW with a
    cosine decay over epochs * ceil(N / batch) steps. Each epoch's loss, accuracy on its noisy
    batches, learning rate and samples/s go to the JSONL log ``log_path`` (the fields of the
    classifier trainer's log; a re-run starts it over)."""
    if config.input == "xt+x0" and denoiser is None:
        raise ConfigError('a denoise-augmented ("xt+x0") classifier needs the denoiser of its x0_hat input')
    torch.manual_seed(config.seed)
    net = create_classifier(name, num_classes=data.info.num_classes,
                            in_chans=guidance_in_chans(config.input, data.info.channels)).to(device).train()
    x0, labels, train_sigmas = data.float_images(), data.labels, train_sigmas.cpu()
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(config.seed)
    log = open_log(log_path, lambda entry: False) if log_path else None
    loss_sum, correct, seen, started = 0.0, 0, 0, time.perf_counter()
    epoch_started = started
    try:
        for step in tqdm(range(steps), desc=f"train noisy {name}", unit="step", disable=not progress):
            index = torch.randint(len(data), (config.batch_size,), generator=gen)
            sigma = train_sigmas[torch.randint(len(train_sigmas), (config.batch_size,), generator=gen)]
            x = x0[index] + sigma.view(-1, 1, 1, 1) * torch.randn(x0[index].shape, generator=gen)
            target = labels[index].to(device)
            denoised = denoised_estimates(denoiser, x, sigma) if config.input == "xt+x0" else None
            logits = net(guidance_net_input(config.input, x, sigma, denoised).to(device))
            loss = F.cross_entropy(logits, target)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(target)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(target)
            if log and (step + 1) % steps_per_epoch == 0:
                now = time.perf_counter()
                log.write(json.dumps({"epoch": (step + 1) // steps_per_epoch, "step": step + 1, "lr": lr,
                                      "train_loss": loss_sum / seen, "train_accuracy": correct / seen, "samples": seen,
                                      "samples_per_second": round(seen / (now - epoch_started), 1),
                                      "seconds": round(now - started, 2)}) + "\n")
                log.flush()
                loss_sum, correct, seen, epoch_started = 0.0, 0, 0, now
    finally:
        if log:
            log.close()
    return net.eval()


def net_inputs(data: LabeledImages, sigma: float, input: str, seed: int, denoiser: Denoiser | None = None) -> Tensor:
    """What a guidance net sees for `data` at noise level `sigma`: the noise is drawn from `seed`
    alone, the same for "xt" and "xt+x0" (whose x0_hat of the noisy images comes from `denoiser`)."""
    x0 = data.float_images()
    if input == "x0":
        return x0
    x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return guidance_net_input(input, x, sigma, denoised_estimates(denoiser, x, sigma) if input == "xt+x0" else None)


def fit_guidance_net(name: str, train: LabeledImages, test: LabeledImages, config: GuidanceTrainConfig,
                     level_sigmas: Tensor, train_sigmas: Tensor, *, denoiser: Denoiser | None = None,
                     device: str = "cpu", progress: bool = True, log_path: Path | None = None,
                     ) -> tuple[GuidanceNet, dict[str, Tensor]]:
    """Train one guidance net for `config.input` (per-epoch figures to the JSONL log ``log_path``;
    `denoiser` gives "xt+x0"'s x0_hat), fit its class Gaussians at every level, and return with it
    which held-out images it classifies correctly at every level (clean images for "x0"), keyed by
    sigma: boolean tensors in the order of `test`."""
    if config.input == "x0":
        classifier_config = ClassifierTrainConfig(dataset=train.info.spec, model=name, epochs=config.epochs,
                                                  batch_size=config.batch_size, lr=config.lr, seed=config.seed)
        net = fit_classifier(classifier_config, train, test, device=device, progress=progress, log_path=log_path)
    else:
        net = fit_noisy_classifier(name, train, train_sigmas, config, denoiser=denoiser, device=device,
                                   progress=progress, log_path=log_path)
    gaussians, correct = [], {}
    for level, sigma in enumerate(level_sigmas.tolist()):
        features = embed(net, net_inputs(train, sigma, config.input, config.seed + level, denoiser))
        gaussians.append(fit_class_gaussians(features, train.labels, train.info.num_classes, config.shrinkage))
        logits = predict_logits(net, net_inputs(test, sigma, config.input, config.seed + 10_000 + level, denoiser))
        correct[f"{sigma:.4g}"] = logits.argmax(1) == test.labels
    return GuidanceNet(net, [g.to(device) for g in gaussians], level_sigmas, config.input).to(device), correct


def accuracy_per_level(correct: dict[str, Tensor]) -> dict[str, float]:
    """Held-out accuracy per level (4 decimals) from fit_guidance_net's per-image correctness."""
    return {key: round(float(flags.float().mean()), 4) for key, flags in correct.items()}


def train_guidance(config: GuidanceTrainConfig, out: str | Path, *, device: str | None = None,
                   progress: bool = True) -> dict:
    """Train both guidance nets and save them with their class Gaussians in `out`; returns guidance.json.
    Each net's per-epoch figures go to ``out/classifier_log.jsonl`` and ``out/discriminator_log.jsonl``."""
    device = default_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    real, test = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "test")
    model = load_diffusion_model(config.model, device)
    meta = model.meta
    if config.input == "xt+x0" and not meta.denoises_without_labels:
        raise ConfigError(f'{config.model} cannot denoise without labels (no null class); "xt+x0" classifiers see '
                          "x0_hat without labels: train the model with --label-dropout")
    if (meta.image_size, meta.channels, meta.num_classes) != (real.info.image_size, real.info.channels,
                                                             real.info.num_classes):
        raise ConfigError(f"model {config.model} makes {meta.channels}x{meta.image_size}px images of "
                          f"{meta.num_classes} classes but dataset {config.dataset!r} has {real.info.channels}x"
                          f"{real.info.image_size}px images of {real.info.num_classes} classes")
    if config.synthetic_shards:
        synthetic = load_dataset(f"shards:{config.synthetic_shards}", "train")
    else:
        synthetic = baseline_samples(model, len(real), config.synthetic, config.synthetic_seed, progress=progress)
    train_sigmas = model.denoiser.train_sigmas.cpu()
    level_sigmas = torch.zeros(1) if config.input == "x0" else noise_levels(train_sigmas, config.levels)
    # x0_hat clamped to [-1, 1], as the sampler's (generate_batch's ClampDenoised, clip_denoised by default)
    denoiser = ClampDenoised(model.denoiser) if config.input == "xt+x0" else None
    classifier, classifier_correct = fit_guidance_net(config.classifier, real, test, config, level_sigmas,
                                                      train_sigmas, denoiser=denoiser, device=device,
                                                      progress=progress, log_path=out / "classifier_log.jsonl")
    disc_train, disc_held = real_vs_synthetic(real, synthetic, config.holdout, config.seed)
    discriminator, disc_correct = fit_guidance_net(config.discriminator, disc_train, disc_held, config, level_sigmas,
                                                   train_sigmas, denoiser=denoiser, device=device,
                                                   progress=progress, log_path=out / "discriminator_log.jsonl")
    common = {"in_chans": guidance_in_chans(config.input, real.info.channels),
              "image_size": real.info.image_size, "train_config": config_dict(config)}
    info = {"config": config_dict(config), "model_hash": model.model_hash, "num_real": len(real),
            "num_synthetic": len(synthetic),
            "classifier_test_accuracy": accuracy_per_level(classifier_correct),
            # per held-out test image, in the test split's order: for paired comparisons of two folders
            "classifier_test_correct": {key: encode_bits(flags.numpy()) for key, flags in classifier_correct.items()},
            "discriminator_holdout_accuracy": accuracy_per_level(disc_correct),
            "classifier_shrinkage": [g.shrinkage.tolist() for g in classifier.gaussians],
            "discriminator_shrinkage": [g.shrinkage.tolist() for g in discriminator.gaussians]}
    return save_guidance(
        out, classifier, {**common, "model": config.classifier, "num_classes": real.info.num_classes,
                          "class_names": list(real.info.class_names)},
        discriminator, {**common, "model": config.discriminator, "num_classes": 2,
                        "class_names": ["synthetic", "real"]}, info)
