"""`tailforge bench eval-speed`: cheaper U-Net evaluations (gen.models.accelerate), each switch
measured against diffusers' eager ``DDPMPipeline`` on identical weights.

For the tiny and small presets (random weights: the cost does not depend on them), one DDPM chain
of the same steps and batch is timed, interleaved round by round, for: diffusers' eager pipeline
(the baseline), our eager sampler, and our sampler with channels_last, with torch.compile
(inductor), with both, and with one thread (``torch.set_num_threads(1)`` around the call, the
thread switch). Reported per variant: images/s, the median over rounds of the round's
diffusers / ours time ratio, and the ratio to our eager sampler.

Outputs compared: the largest absolute difference of one U-Net forward against diffusers' eager
U-Net on the same input, and of the whole chain's uint8 images against our eager chain (same
noise). Compile time is the compiled variant's first call minus its median steady call, reported
apart from the steady rate (the timed rounds start after it). A profile of one eager and one
compiled forward (the operators with the largest self CPU time) is kept as the explanation of
what remains.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from tailforge.bench import benchmark
from tailforge.bench.sampler import _random_model, interleaved_seconds, median_ratio
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.models.accelerate import AccelerationConfig, accelerate
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model

#: the settings compared with the eager sampler; threads=1 is the thread switch on a 2-core host
VARIANTS = (AccelerationConfig(channels_last=True), AccelerationConfig(compile=True),
            AccelerationConfig(channels_last=True, compile=True), AccelerationConfig(threads=1))


def with_threads(threads: int | None, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with torch's intra-op threads set to `threads` (restored after), so a thread
    setting can be interleaved with the others in one process."""
    if threads is None:
        return fn

    def run() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def top_operators(fn: Callable[[], Any], count: int = 6) -> list[dict[str, Any]]:
    """The `count` operators with the largest self CPU time in one call of `fn`, with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:count]]


def compare_variants(model: DiffusionModel, scheduler: DDPMScheduler, *, batch: int, steps: int,
                     rounds: int) -> dict[str, Any]:
    """The interleaved comparison of the module docstring for one model."""
    unet = model.denoiser.eps_model.unet
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    sampling = SamplingConfig(sampler="ddpm", steps=steps)
    indices = list(range(batch))
    models = {config.label(): accelerate(model, AccelerationConfig(channels_last=config.channels_last,
                                                                   compile=config.compile))
              for config in VARIANTS}
    threads = {config.label(): config.threads for config in VARIANTS}

    def ours(m: DiffusionModel) -> Callable[[], torch.Tensor]:
        return lambda: generate_batch(m, sampling, 0, indices, None)

    eager_images = ours(model)()
    x = torch.randn(batch, model.meta.channels, model.meta.image_size, model.meta.image_size,
                    generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), scheduler.config.num_train_timesteps // 2)
    with torch.no_grad():
        reference_forward = unet(x, t).sample
    first_call: dict[str, float] = {}
    checks: dict[str, dict[str, Any]] = {}
    for label, accelerated in models.items():
        started = time.perf_counter()
        images = with_threads(threads[label], ours(accelerated))()
        first_call[label] = time.perf_counter() - started
        with torch.no_grad():
            forward = accelerated.denoiser.eps_model.unet(x, t).sample
        differing = images.to(torch.int16) - eager_images.to(torch.int16)
        checks[label] = {"max_abs_diff_unet_forward_vs_diffusers": float((forward - reference_forward).abs().max()),
                         "max_abs_diff_uint8_chain_vs_our_eager": int(differing.abs().max()),
                         "pixels_differing_from_our_eager": round(float((differing != 0).float().mean()), 5)}

    generator = torch.Generator().manual_seed(0)
    labels = ["eager", *models]
    fns = [lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=generator, output_type="np"),
           ours(model), *[with_threads(threads[label], ours(models[label])) for label in models]]
    seconds = dict(zip(["diffusers", *labels], interleaved_seconds(fns, rounds)))
    result: dict[str, Any] = {"batch": batch, "steps": steps, "rounds": rounds,
                              "diffusers_eager_images_per_s": round(batch / min(seconds["diffusers"]), 1)}
    for label in labels:
        entry = {"images_per_s": round(batch / min(seconds[label]), 1),
                 "median_ratio_vs_diffusers_eager": median_ratio(seconds["diffusers"], seconds[label]),
                 "median_ratio_vs_our_eager": median_ratio(seconds["eager"], seconds[label])}
        if label in models:
            steady = statistics.median(seconds[label])
            entry.update(checks[label], first_call_s=round(first_call[label], 2),
                         compile_s=round(max(0.0, first_call[label] - steady), 2) if "compile" in label else 0.0)
        result[label] = entry
    compiled_unet = models["compile"].denoiser.eps_model.unet
    with torch.no_grad():
        result["profile_eager_forward"] = top_operators(lambda: unet(x, t))
        result["profile_compiled_forward"] = top_operators(lambda: compiled_unet(x, t))
    return result


@benchmark("eval-speed", "channels_last, torch.compile and threads for our sampler vs diffusers' eager DDPMPipeline, "
                         "tiny and small presets, outputs compared (goal >= 1.5x at identical outputs)")
def bench_eval_speed(quick: bool, workdir: Path) -> dict[str, Any]:
    configs = [("tiny", 8, 1, 128), ("small", 16, 3, 32)]
    steps, rounds = (10, 3) if quick else (20, 7)
    result: dict[str, Any] = {"device": "cpu", "torch_threads": torch.get_num_threads(), "sampler": "ddpm"}
    for preset, size, channels, batch in configs:
        folder = _random_model(workdir / f"{preset}-{size}", preset, size, channels)
        model = load_diffusion_model(folder, "cpu")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        result[preset] = {"image_size": size, "channels": channels,
                          **compare_variants(model, scheduler, batch=batch, steps=steps, rounds=rounds)}
    return result
