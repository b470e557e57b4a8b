"""Diffusion-model training: epsilon prediction (Ho et al. 2020, Eq. 14, L_simple), AdamW, EMA,
safetensors checkpoints and exact resume.

Every step's minibatch, timesteps and noise come from a generator seeded by (seed, step), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have (no RNG state has
to be pickled), and the training data order does not depend on when the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm import tqdm

from tailforge.gen.core.device import default_device
from tailforge.gen.core.files import config_dict, load_module_state, load_safetensors, saved_result
from tailforge.gen.core.noise import derive_seed
from tailforge.gen.data.datasets import LabeledImages, load_dataset
from tailforge.gen.diffusion.config import BETA_SCHEDULES
from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
from tailforge.gen.models.unet import build_unet, default_preset
from tailforge.train.config import DiffusionTrainConfig
from tailforge.train.run_folder import CheckpointFolders, load_optimizer, open_log, save_optimizer

CHECKPOINTS = "checkpoints"


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, step))


def training_batch(data: LabeledImages, images: torch.Tensor, scheduler: DDPMScheduler, batch_size: int,
                   gen: torch.Generator, hflip: bool):
    """(x_t, t, labels, eps) for one step: images drawn uniformly with replacement, t ~ U{0..T-1},
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. 2020, Algorithm 1)."""
    index = torch.randint(len(data), (batch_size,), generator=gen)
    x0 = images[index]
    if hflip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return scheduler.add_noise(x0, eps, t), t, data.labels[index], eps


def drop_labels(labels: torch.Tensor, probability: float, null_class: int, gen: torch.Generator) -> torch.Tensor:
    """Each label replaced by `null_class` with `probability` (classifier-free guidance's training, Ho &
    Salimans 2022, Algorithm 1); no draw at all when the probability is 0, so such runs are unchanged."""
    if probability == 0:
        return labels
    return torch.where(torch.rand(labels.shape, generator=gen) < probability, null_class, labels)


def _lr_at(step: int, config: DiffusionTrainConfig) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


#: Settings a resumed run may change: more --steps may be asked for (the learning rate is constant
#: after warmup, so extending a run is the same run), and how often / how many checkpoints are kept.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints")


def _checkpoints(out: Path, config_json: dict, keep: int) -> CheckpointFolders:
    """OUT/checkpoints/step-NNNNNNN/: unet/ (diffusers folder), ema.safetensors, the optimizer state."""
    return CheckpointFolders(out / CHECKPOINTS, "step", 7, config_json, RESUMABLE_CHANGES, keep)


def _save_checkpoint(checkpoints: CheckpointFolders, step: int, unet: UNet2DModel, ema: EMAModel, optimizer) -> None:
    def write(folder: Path) -> None:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        names = [n for n, _ in unet.named_parameters()]
        save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, ema.shadow_params)},
                  str(folder / "ema.safetensors"))
        save_optimizer(optimizer, folder)

    checkpoints.save(step, write)


def _resume(checkpoints: CheckpointFolders, unet: UNet2DModel, ema: EMAModel, optimizer) -> int:
    """Load the newest checkpoint if there is one; returns the step to continue from."""
    found = checkpoints.latest()
    if found is None:
        return 0
    latest, state = found
    load_module_state(unet, latest / "unet" / "diffusion_pytorch_model.safetensors")
    shadow = load_safetensors(latest / "ema.safetensors")
    ema.shadow_params = [shadow[n].to(p.device) for n, p in unet.named_parameters()]
    ema.optimization_step = int(state["step"])
    load_optimizer(optimizer, latest)
    return int(state["step"])


def train_diffusion(config: DiffusionTrainConfig, out: str | Path, *, device: str | None = None,
                    progress: bool = True, log_every: int = 50) -> Path:
    """Train a class-conditional DDPM on `config.dataset` and export the EMA model folder to `out`."""
    out = Path(out)
    device = default_device(device)
    data = load_dataset(config.dataset, "train")
    info = data.info
    preset = config.preset or default_preset(info.image_size)
    resolved = dataclasses.replace(config, preset=preset)
    config_json = config_dict(resolved)
    # a finished run with this config: nothing to train, nothing to rewrite
    if saved_result(out / "tailforge.json", config_json, "model description", key="train_config", step=config.steps):
        return out
    torch.manual_seed(config.seed)
    null_class = info.num_classes if config.label_dropout else None  # the embedding after the real classes
    embeddings = None if not config.class_conditional else info.num_classes + (null_class is not None)
    unet = build_unet(preset, image_size=info.image_size, channels=info.channels, num_classes=embeddings).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                              beta_schedule=BETA_SCHEDULES[config.beta_schedule])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = _checkpoints(out, config_json, config.keep_checkpoints)
    start = _resume(checkpoints, unet, ema, optimizer)
    images = data.float_images()
    hflip = info.flip_augment if config.hflip is None else config.hflip
    labels_on = config.class_conditional
    # entries of steps after the checkpoint resumed from are dropped: they are redone
    log = open_log(out / "train_log.jsonl", lambda entry: entry.get("step", 0) <= start)
    bar = tqdm(total=config.steps, initial=start, desc="train diffusion", unit="step", disable=not progress)
    window, started = [], time.perf_counter()
    window_started = started
    unet.train()
    try:  # the log is closed (its TensorBoard events written) however training ends
        for step in range(start, config.steps):
            gen = step_generator(config.seed, step)
            x_t, t, labels, eps = training_batch(data, images, scheduler, config.batch_size, gen, hflip)
            labels = drop_labels(labels, config.label_dropout, null_class, gen) if null_class is not None else labels
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            pred = unet(x_t.to(device), t.to(device), class_labels=labels.to(device) if labels_on else None).sample
            loss = F.mse_loss(pred, eps.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step} "
                                         f"(dataset {config.dataset!r}); lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            optimizer.step()
            ema.step(unet.parameters())
            window.append(loss.item())
            bar.update(1)
            done = step + 1
            if done % log_every == 0 or done == config.steps:
                mean_loss = float(np.mean(window))
                now = time.perf_counter()
                samples_per_second = len(window) * config.batch_size / (now - window_started)
                log.write(json.dumps({"step": done, "loss": mean_loss, "lr": _lr_at(step, config),
                                      "samples_per_second": round(samples_per_second, 1),
                                      "seconds": round(now - started, 2)}) + "\n")
                window_started = now
                log.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                window = []
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save_checkpoint(checkpoints, done, unet, ema, optimizer)
    finally:
        bar.close()
        log.close()
    ema_unet = build_unet(preset, image_size=info.image_size, channels=info.channels, num_classes=embeddings)
    ema_unet.load_state_dict(unet.state_dict())
    ema.copy_to(ema_unet.parameters())
    meta = ModelMeta(image_size=info.image_size, channels=info.channels,
                     num_classes=info.num_classes if config.class_conditional else None,
                     class_names=info.class_names, null_class=null_class, dataset=config.dataset,
                     train_config=config_json, step=config.steps)
    save_diffusion_model(out, ema_unet, scheduler, meta)
    return out

