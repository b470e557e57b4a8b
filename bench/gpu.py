"""`tailforge bench gpu`: the one-shot GPU benchmark (needs nothing but the repository and a CUDA
device; about 5-8 minutes on one GPU).

1. Sampler throughput on the DDPM paper's CIFAR-10 U-Net (Ho et al. 2020, Appendix B; the
   ``ddpm-cifar10`` preset: google/ddpm-cifar10-32's layout, 35.7M parameters), randomly
   initialised (throughput does not depend on the weights; nothing is downloaded), batch 256,
   DDPM over `steps` steps: diffusers' eager ``DDPMPipeline`` against our sampler eager, in
   channels_last, and in channels_last + torch.compile (gen.models.accelerate), in three
   precisions: fp32 (TF32 off), TF32 (matmul and cuDNN), and bf16 autocast. Each precision's
   variants run interleaved; compile time is the compiled variant's first call, reported apart.
   Achieved TFLOP/s = the FLOPs of one forward per image (``torch.utils.flop_counter.FlopCounterMode``)
   x images/s x steps, as a fraction of the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`,
   keyed by ``torch.cuda.get_device_name()``; ``--set peak_tflops=...`` overrides).
2. The guided / unguided step ratio of low-density sampling (Sehwag et al. 2022 Algorithm 1;
   bench.guidance, tiny model, batch 128) on the GPU.
3. The DiffAug (Sastry et al. 2023) actor-pool trainer step over the plain step (bench.diffaug at
   full size, whose actor picks the GPU).

On a machine without a CUDA device it refuses with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from tailforge.bench import BenchmarkUnavailable, benchmark
from tailforge.bench.sampler import _random_model, interleaved_seconds, median_ratio
from tailforge.gen.core.checks import PositiveFloat, PositiveInt, check_fields
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.models.accelerate import AccelerationConfig, accelerate
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model

#: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched as
#: substrings of torch.cuda.get_device_name(), most specific first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)

PRECISIONS = ("fp32", "tf32", "bf16")
#: our variants, compared with diffusers' eager pipeline in every precision
VARIANTS = (AccelerationConfig(), AccelerationConfig(channels_last=True),
            AccelerationConfig(channels_last=True, compile=True))


@dataclasses.dataclass(frozen=True)
class GpuOptions:
    """`tailforge bench gpu --set FIELD=VALUE`."""

    peak_tflops: PositiveFloat | None = None  # the device's dense bf16 peak in TFLOP/s (None: from the table)
    batch: PositiveInt = 256  # images per sampling batch
    steps: PositiveInt = 100  # DDPM steps per timed chain
    rounds: PositiveInt = 2  # interleaved timed rounds per precision (after one untimed call each)

    def __post_init__(self):
        check_fields(self)


def peak_bf16_tflops(device_name: str, override: float | None = None) -> float | None:
    """The override, else the table's peak for the first key contained in `device_name`, else None."""
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BenchmarkUnavailable("bench gpu needs a CUDA device; none is visible here "
                                   "(torch.cuda.is_available() is False)")


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """fp32 with TF32 off, TF32 on for matmuls and cuDNN convolutions, or bf16 autocast (weights
    stay fp32); the previous TF32 settings are restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        if name == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def in_precision(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with precision(name):
            return fn()

    return run


def forward_flops(model: DiffusionModel) -> int:
    """FLOPs of one U-Net forward on one image (FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = model.meta
    x = torch.zeros(1, meta.channels, meta.image_size, meta.image_size, device=model.device)
    t = torch.zeros(1, device=model.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.denoiser.eps_model.unet(x, t)
    return int(counter.get_total_flops())


def sampler_throughput(model: DiffusionModel, scheduler: DDPMScheduler, options: GpuOptions,
                       peak: float | None) -> dict[str, Any]:
    """Part 1 of the module docstring."""
    batch, steps = options.batch, options.steps
    flops = forward_flops(model)
    pipe = DDPMPipeline(unet=model.denoiser.eps_model.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    indices = list(range(batch))
    sampling = SamplingConfig(sampler="ddpm", steps=steps)
    models = {config.label(): accelerate(model, config) for config in VARIANTS}
    result: dict[str, Any] = {"forward_gflops_per_image": round(flops / 1e9, 3), "batch": batch, "steps": steps}
    for name in PRECISIONS:
        generator = torch.Generator("cuda").manual_seed(0)
        fns = {"diffusers_eager": lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=generator,
                                               output_type="np")}
        fns.update({f"ours_{label}": (lambda m=m: generate_batch(m, sampling, 0, indices, None))
                    for label, m in models.items()})
        first_call = {}
        for label, fn in fns.items():  # the first call compiles (compiled variants) and warms cuDNN
            started = time.perf_counter()
            in_precision(name, fn)()
            first_call[label] = time.perf_counter() - started
        seconds = dict(zip(fns, interleaved_seconds([in_precision(name, fn) for fn in fns.values()],
                                                    options.rounds)))
        entries = {}
        for label, times in seconds.items():
            images_per_s = batch / min(times)
            achieved = flops * images_per_s * steps / 1e12
            entries[label] = {
                "images_per_s": round(images_per_s, 1),
                "images_per_s_at_1000_steps": round(images_per_s * steps / 1000, 1),
                "achieved_tflops": round(achieved, 1),
                "fraction_of_bf16_peak": round(achieved / peak, 4) if peak else None,
                "median_ratio_vs_diffusers_eager": median_ratio(seconds["diffusers_eager"], times),
                "first_call_s": round(first_call[label], 2),
                "compile_s": round(max(0.0, first_call[label] - statistics.median(times)), 2)
                if "compile" in label else 0.0}
        result[name] = entries
    return result


@benchmark("gpu", "one-shot GPU benchmark: ddpm-cifar10 U-Net sampler images/s ours vs diffusers in fp32/TF32/bf16, "
                  "channels_last, compile, share of bf16 peak; guided/unguided step; DiffAug pool step (needs CUDA)",
           options=GpuOptions)
def bench_gpu(quick: bool, workdir: Path, options: GpuOptions) -> dict[str, Any]:
    require_cuda()
    from tailforge.bench.diffaug import bench_diffaug
    from tailforge.bench.guidance import compare_guided_step, random_guidance

    started = time.perf_counter()
    name = torch.cuda.get_device_name(0)
    peak = peak_bf16_tflops(name, options.peak_tflops)
    if quick:
        options = dataclasses.replace(options, batch=min(options.batch, 64), steps=min(options.steps, 20))
    folder = _random_model(workdir / "ddpm-cifar10-32", "ddpm-cifar10", 32, 3)
    model = load_diffusion_model(folder, "cuda")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    result: dict[str, Any] = {"device_name": name, "peak_bf16_tflops": peak,
                              "peak_source": "override" if options.peak_tflops else "PEAK_BF16_TFLOPS table",
                              "model": "ddpm-cifar10 preset (35.7M parameters), random weights",
                              "parameters": sum(p.numel() for p in model.denoiser.parameters())}
    result["sampler"] = sampler_throughput(model, scheduler, options, peak)
    tiny = _random_model(workdir / "tiny-8", "tiny", 8, 1)
    guidance = random_guidance(workdir / "guidance-random")
    result["guidance"] = {sampler: compare_guided_step(tiny, guidance, sampler, batch=128, steps=50, repeats=2,
                                                       step_rounds=15, device="cuda") for sampler in ("ddpm", "ddim")}
    result["diffaug"] = bench_diffaug(quick, workdir / "diffaug")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result
