"""`tailforge bench reconstruct`: real-sample reconstruction (Yamaguchi & Fukuda 2023 Alg. 1) vs full-chain generation.

Reconstruction at t_re runs the sampler from t = t_re * T back to 0 with round(steps * t_re)
denoiser steps (``gen.methods.reconstruct.chain_steps``), so its time should be t_re of a full chain's.
Both sides are the real job paths on the same model, sampler (DDPM), full step count and batch:
``ReconstructSource.reconstruct_batch`` (digits images, uint8 in and out) against
``gen.diffusion.samplers.generate_batch`` (uint8 out), timed interleaved. The goal is that the time ratio
lies within 10 % of t_re (relative: |ratio / t_re - 1| <= 0.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailforge.bench import benchmark
from tailforge.bench.sampler import _random_model, best_seconds_interleaved
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.jobs.config import ReconstructConfig
from tailforge.gen.jobs.sources import ReconstructSource
from tailforge.gen.models.diffusion import load_diffusion_model

T_RES = (0.3, 0.5, 1.0)


def within_tolerance(time_ratio: float, t_re: float, tolerance: float = 0.1) -> bool:
    """Is the reconstruction/generation time ratio within `tolerance` (relative) of t_re?"""
    return abs(time_ratio / t_re - 1.0) <= tolerance


@benchmark("reconstruct", "reconstruction at t_re in {0.3, 0.5, 1} vs full-chain DDPM generation, same model/steps/batch "
                          "(goal: time ratio within 10 % of t_re)")
def bench_reconstruct(quick: bool, workdir: Path) -> dict[str, Any]:
    batch, steps, repeats = (32, 20, 2) if quick else (128, 250, 3)
    model_dir = _random_model(workdir / "tiny-8", "tiny", 8, 1)  # 8x8 grey: the digits images' shape
    model = load_diffusion_model(model_dir, "cpu")
    sampling = SamplingConfig(sampler="ddpm", steps=steps)
    indices = list(range(batch))
    sources = [ReconstructSource(ReconstructConfig(model=str(model_dir), dataset="digits", t_re=t_re,
                                                   sampling=sampling), device="cpu") for t_re in T_RES]
    seconds = best_seconds_interleaved(
        [lambda: generate_batch(model, sampling, 0, indices, None)]
        + [lambda source=source: source.reconstruct_batch(indices) for source in sources], repeats)
    full = seconds[0]
    result: dict[str, Any] = {"model": "tiny U-Net 8x8, random weights", "dataset": "digits (train split)",
                              "sampler": "ddpm", "full_steps": steps, "batch": batch,
                              "generation_s": round(full, 4), "generation_images_per_s": round(batch / full, 1)}
    for t_re, source, secs in zip(T_RES, sources, seconds[1:]):
        time_ratio = secs / full
        result[f"t_re_{t_re:g}"] = {"chain_steps": source.chain.steps, "reconstruct_s": round(secs, 4),
                                    "reconstruct_images_per_s": round(batch / secs, 1),
                                    "ratio_reconstruct_over_generation": round(time_ratio, 3),
                                    "ratio_over_t_re": round(time_ratio / t_re, 3),
                                    "within_10pct_of_t_re": within_tolerance(time_ratio, t_re)}
    return result
