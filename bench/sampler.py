"""`tailforge bench sampler` and `tailforge bench ray`: sampling throughput.

sampler: our DDPM / DDIM samplers (sigma-space Denoiser, per-sample noise generators, uint8
output) against diffusers' ``DDPMPipeline`` / ``DDIMPipeline`` on the same U-Net, steps and batch,
images/s side by side. Both clamp x0_hat to [-1, 1] (diffusers' default ``clip_sample=True``) and
both return uint8-ready images, so the work compared is the same.

ray: a `gen baseline` job on a pool of GenerateActors against the same job in this process
(``actors=0``), same model, sampler, shards and batch: wall time of the whole job (actor start-up
included) and the steady-state rate (samples over the summed per-shard seconds, per actor). The
local Ray instance is started, and a one-shard job run on it, before anything is timed: a fresh
instance spends its first seconds starting its own processes (idle workers import Ray), and on a
2-core machine that CPU came out of the first timed shards (0.70x per actor at the quick size,
against 0.97x for the same batches timed inside a warm actor).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from tailforge.bench import benchmark
from tailforge.gen.core.device import default_device
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.ray import connect
from tailforge.gen.jobs.runner import run_config_job
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.models.diffusion import ModelMeta, load_diffusion_model, save_diffusion_model
from tailforge.gen.models.unet import build_unet


def _random_model(folder: Path, preset: str, image_size: int, channels: int) -> Path:
    """An unconditional random-weight model folder: throughput does not depend on the weights."""
    if not (folder / "tailforge.json").is_file():
        torch.manual_seed(0)
        save_diffusion_model(folder, build_unet(preset, image_size=image_size, channels=channels, num_classes=None),
                             DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"),
                             ModelMeta(image_size=image_size, channels=channels, num_classes=None))
    return folder


def interleaved_seconds(fns: list, repeats: int) -> list[list[float]]:
    """Wall times of each function in `repeats` rounds, run interleaved (a, b, a, b, ...) after one
    warm-up each, so a load change on the machine hits both sides of a round alike."""
    for fn in fns:
        fn()
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for times, fn in zip(seconds, fns):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return seconds


def best_seconds_interleaved(fns: list, repeats: int) -> list[float]:
    """Best-of-`repeats` wall time of each function (:func:`interleaved_seconds`)."""
    return [min(times) for times in interleaved_seconds(fns, repeats)]


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator measured in the same round: on a shared host
    whose speed drifts by a third between minutes, the ratio of the two best-of figures can pair a
    fast minute with a slow one; a round's two sides share their minute."""
    return round(statistics.median(n / d for n, d in zip(numerator, denominator)), 3)


def compare_samplers(model_dir: Path, *, batch: int, steps: int, repeats: int, device: str) -> dict[str, Any]:
    model = load_diffusion_model(model_dir, device)
    unet = model.denoiser.eps_model.unet
    ddpm = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    pipes = {"ddpm": DDPMPipeline(unet=unet, scheduler=ddpm),
             "ddim": DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))}
    results: dict[str, Any] = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device).manual_seed(0)
        reference_s, ours_s = interleaved_seconds([
            lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=generator, output_type="np"),
            lambda: generate_batch(model, SamplingConfig(sampler=name, steps=steps), 0, list(range(batch)), None),
        ], repeats)
        reference, ours = min(reference_s), min(ours_s)
        results[name] = {"diffusers_images_per_s": round(batch / reference, 1),
                         "ours_images_per_s": round(batch / ours, 1),
                         "ratio_ours_over_diffusers": round(reference / ours, 3),
                         "median_ratio_ours_over_diffusers": median_ratio(reference_s, ours_s), "rounds": repeats}
    return results


@benchmark("sampler", "our DDPM/DDIM samplers vs diffusers' DDPMPipeline/DDIMPipeline, same U-Net/steps/batch (goal >= 1.0x on CPU)")
def bench_sampler(quick: bool, workdir: Path) -> dict[str, Any]:
    device = default_device()
    configs = [("tiny", 8, 1, 128, 50)]
    if not quick:
        configs.append(("ddpm-cifar10", 32, 3, 256 if device == "cuda" else 16, 50))
    result: dict[str, Any] = {"device": device}
    for preset, size, channels, batch, steps in configs:
        model_dir = _random_model(workdir / f"{preset}-{size}", preset, size, channels)
        result[preset] = {"image_size": size, "channels": channels, "batch": batch, "steps": steps,
                          **compare_samplers(model_dir, batch=batch, steps=steps, repeats=3,
                                             device=device)}
    return result


@benchmark("ray", "actor-pool generation job vs the same job in one process (goal >= 0.95x per actor; scaling with actors)")
def bench_ray(quick: bool, workdir: Path) -> dict[str, Any]:
    model_dir = _random_model(workdir / "tiny-8", "tiny", 8, 1)
    num, shard_size = (256, 64) if quick else (1024, 128)
    sampling = SamplingConfig(sampler="ddim", steps=20 if quick else 50)
    result: dict[str, Any] = {"samples": num, "shard_size": shard_size, "sampler": "ddim", "steps": sampling.steps}
    connect()
    warmup = BaselineConfig(model=str(model_dir), num=shard_size, sampling=sampling, shard_size=shard_size, batch_size=64)
    run_config_job(workdir / "warm-up", warmup, BaselineSource, shard_size, actors=1, progress=False)
    for actors in (0, 1, 2):
        out = workdir / f"actors-{actors}"
        shutil.rmtree(out, ignore_errors=True)
        config = BaselineConfig(model=str(model_dir), num=num, sampling=sampling, shard_size=shard_size, batch_size=64)
        start = time.perf_counter()
        records = run_config_job(out, config, BaselineSource, num, actors=actors, progress=False)
        wall = time.perf_counter() - start
        busy = sum(r.seconds for r in records)
        result[f"actors_{actors}"] = {"wall_s": round(wall, 2), "job_images_per_s": round(num / wall, 1),
                                      "per_actor_images_per_s": round(num / busy, 1)}
    in_process = result["actors_0"]["per_actor_images_per_s"]
    for actors in (1, 2):
        entry = result[f"actors_{actors}"]
        entry["per_actor_ratio_vs_in_process"] = round(entry["per_actor_images_per_s"] / in_process, 3)
        entry["job_ratio_vs_in_process"] = round(entry["job_images_per_s"] / result["actors_0"]["job_images_per_s"], 3)
        # the actors running side by side once started (each of the 2 actors holds 1 of the 2 cores)
        entry["steady_job_ratio_vs_in_process"] = round(actors * entry["per_actor_images_per_s"] / in_process, 3)
    return result
