"""`tailforge bench guidance`: a low-density-guided sampling step vs the unguided step.

Sehwag et al. 2022 Algorithm 1 adds, on every step but the last, the normalized gradients of two losses
(hardness through the embedding classifier, L_g1, and fidelity through the real-vs-synthetic
discriminator, L_g2). :class:`~tailforge.gen.methods.lowdensity.LowDensityGuidance` wraps the denoiser, so
the guided step is the unguided step plus one forward and one backward pass of each guidance net.
Two figures per sampler (DDPM and DDIM), both sides on the same model, batch, grid and inputs:

* step: one denoiser call plus the sampler's step arithmetic at a mid-chain noise level, guided
  vs unguided (the guidance term is present on every step but the last); the goal is judged on
  the median over interleaved rounds of the round's guided / unguided ratio (the best-of times
  are reported too);
* chain: a whole ``gen.diffusion.samplers.generate_batch`` run divided by its steps, guided
  (``gen.methods.lowdensity.generate_guided_batch``) vs unguided: what a generation job pays per step.

``direction_share`` is the time of ``gen.methods.lowdensity.guidance_direction`` alone (the two guidance
gradients) as a fraction of the guided step: the part the ratio's excess consists of.
The guidance folder holds random-weight tinycnn nets with class Gaussians of their embeddings of
random images, saved and loaded the way `tailforge train guidance` writes them (x0 input, the
default): the cost of a forward/backward pass does not depend on the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tailforge.bench import benchmark
from tailforge.bench.sampler import _random_model, best_seconds_interleaved, interleaved_seconds, median_ratio
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.denoiser import ClampDenoised
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch, sampler_sigmas
from tailforge.gen.methods.config import GuidanceConfig
from tailforge.gen.methods.lowdensity import (
    GuidanceModels,
    GuidanceNet,
    LowDensityGuidance,
    fit_class_gaussians,
    generate_guided_batch,
    guidance_direction,
    step_rule,
)
from tailforge.gen.models.classifiers import create_classifier, embed
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.gen.models.guidance import load_guidance, save_guidance

NUM_CLASSES = 10


def _random_guidance_net(num_classes: int, seed: int) -> tuple[GuidanceNet, dict[str, Any]]:
    """A random-weight tinycnn ("x0" input) with class Gaussians of its embeddings of random images."""
    torch.manual_seed(seed)
    net = create_classifier("tinycnn", num_classes=num_classes, in_chans=1).eval()
    images = torch.rand(20 * num_classes, 1, 8, 8) * 2 - 1
    labels = torch.arange(len(images)) % num_classes
    gaussians = fit_class_gaussians(embed(net, images), labels, num_classes, "ledoit_wolf")
    return GuidanceNet(net, [gaussians], torch.zeros(1), "x0"), {"model": "tinycnn", "num_classes": num_classes,
                                                                  "in_chans": 1}


def random_guidance(folder: Path) -> GuidanceModels:
    """A guidance folder of random-weight nets (classifier: 10 classes, discriminator: 2), loaded back."""
    if not (folder / "guidance.json").is_file():
        classifier, classifier_config = _random_guidance_net(NUM_CLASSES, 0)
        discriminator, discriminator_config = _random_guidance_net(2, 1)
        save_guidance(folder, classifier, classifier_config, discriminator, discriminator_config,
                      {"note": "random weights (bench guidance)"})
    return load_guidance(folder)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator rounded for the table (both seconds of the same work unit)."""
    return round(numerator / denominator, 3)


def compare_guided_step(model_dir: Path, guidance: GuidanceModels, sampler: str, *, batch: int, steps: int,
                        repeats: int, step_rounds: int, device: str = "cpu") -> dict[str, Any]:
    """The step and chain figures of the module docstring, on `device` (the guidance nets are moved
    there; a step's result is copied back to the CPU so that a GPU's queue is drained in its time)."""
    model = load_diffusion_model(model_dir, device)
    guidance = guidance.to(device)
    sampling = SamplingConfig(sampler=sampler, steps=steps)
    guide = GuidanceConfig()  # alpha = beta = 0.5, the paper's defaults
    indices = list(range(batch))
    labels = balanced_labels(indices, NUM_CLASSES).to(device)

    # one step at a mid-chain noise level: denoiser call (guided or not) + the sampler's pure step
    sigmas = sampler_sigmas(sampler, model.denoiser, steps)
    rule = step_rule(sampler, sampling.sampler_settings())
    plain = ClampDenoised(model.denoiser)
    guided = LowDensityGuidance(plain, guidance, guide, sigmas, rule)
    s, s_next = sigmas[steps // 2], sigmas[steps // 2 + 1]
    gen = torch.Generator().manual_seed(0)
    x = (s * torch.randn(batch, 1, 8, 8, generator=gen)).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    s, s_next = s.to(device), s_next.to(device)
    denoised = plain(x, s.expand(batch), labels)

    def step(denoiser):
        with torch.no_grad():
            return rule.step(x, denoiser(x, s.expand(batch), labels), s, s_next, noise).cpu()

    unguided_steps, guided_steps, directions = interleaved_seconds([
        lambda: step(plain), lambda: step(guided),
        lambda: guidance_direction(guidance, denoised, s, labels, guide).cpu()], step_rounds)
    unguided_step, guided_step, direction = min(unguided_steps), min(guided_steps), min(directions)
    step_ratio = median_ratio(guided_steps, unguided_steps)
    unguided_chain, guided_chain = best_seconds_interleaved([
        lambda: generate_batch(model, sampling, 0, indices, labels),
        lambda: generate_guided_batch(model, guidance, sampling, guide, 0, indices, labels)], repeats)
    return {
        "unguided_step_ms": round(1e3 * unguided_step, 2), "guided_step_ms": round(1e3 * guided_step, 2),
        "ratio_guided_over_unguided_step": ratio(guided_step, unguided_step),
        "median_ratio_guided_over_unguided_step": step_ratio, "step_rounds": step_rounds,
        "direction_ms": round(1e3 * direction, 2), "direction_share_of_guided_step": ratio(direction, guided_step),
        "unguided_chain_ms_per_step": round(1e3 * unguided_chain / steps, 2),
        "guided_chain_ms_per_step": round(1e3 * guided_chain / steps, 2),
        "ratio_guided_over_unguided_chain": ratio(guided_chain, unguided_chain),
        "goal_met_step": step_ratio <= 1.5,
    }


@benchmark("guidance", "alpha/beta low-density-guided sampling step vs the unguided step, DDPM and DDIM (goal <= 1.5x)")
def bench_guidance(quick: bool, workdir: Path) -> dict[str, Any]:
    # batch 128: the default batch of a low-density job (LowDensityConfig.batch_size); quick runs a
    # shorter chain, not a smaller batch, whose per-op overheads would weigh more than in a job
    preset, size, batch, steps = ("tiny", 8, 128, 8) if quick else ("tiny", 8, 128, 50)
    model_dir = _random_model(workdir / f"{preset}-{size}", preset, size, 1)
    guidance = random_guidance(workdir / "guidance-random")
    result: dict[str, Any] = {"model": f"{preset} U-Net {size}x{size}, random weights", "batch": batch,
                              "steps": steps, "alpha": 0.5, "beta": 0.5, "guidance_input": guidance.input,
                              "guidance_nets": "tinycnn classifier (10 classes) + tinycnn discriminator, random weights"}
    for sampler in ("ddpm", "ddim"):
        result[sampler] = compare_guided_step(model_dir, guidance, sampler, batch=batch, steps=steps,
                                              repeats=2 if quick else 5, step_rounds=15 if quick else 40)
    share = max(result[s]["direction_share_of_guided_step"] for s in ("ddpm", "ddim"))
    result["note"] = (f"the guided step adds a forward and a backward pass through each of the two guidance nets "
                      f"(guidance_direction): up to {share:.0%} of the guided step here, the whole excess over the "
                      "unguided step. A larger U-Net with the same guidance nets has a lower ratio. Algorithm 1 "
                      "skips guidance on the last step, so the chain ratio is a little below the step ratio when "
                      "both are measured in the same minute.")
    return result
