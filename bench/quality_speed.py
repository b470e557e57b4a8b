"""`tailforge bench quality-speed`: wall time per sample at equal quality, ours vs diffusers.

For every registered sampler (``gen.diffusion.config.SAMPLERS``, so a newly registered solver
appears without a change here) and a range of step counts, N images are sampled from a trained
model and scored by their Frechet distance (Heusel et al. 2017, ``eval.fidelity``) in the
evaluation classifier's embedding against the real test split, with a bootstrap interval over
the generated images (the real split is the fixed reference of every row, so it is not
resampled; resampling with replacement duplicates images, which shifts the bootstrap FDs up a
little at equal N, the same for every row). Each row also records the network evaluations per
sample and the wall time per sample.

diffusers' own ``DDPMPipeline`` at 1000 steps (the papers' baseline sampler: Sehwag et al. 2022
and Yamaguchi & Fukuda 2023 sample with DDPM) runs on the same weights and labels and is scored
the same way. The headline is the cheapest of our settings whose FD is not shown to be worse
than the pipeline's (the two-sample bootstrap interval of FD(ours) - FD(pipeline) does not lie
wholly above 0) and lies inside the pipeline's own interval, and the pipeline's wall time per sample over that setting's, both measured in
this run. Our side runs the U-Net with the switches of gen.models.accelerate that pay on the
machine (``--set compile=false`` for the eager U-Net); the pipeline runs diffusers' eager U-Net.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from torch import Tensor, nn

from tailforge.bench import BenchmarkUnavailable, benchmark
from tailforge.eval.fidelity import frechet_distance, gaussian_statistics
from tailforge.eval.stats import Interval, bias_shifted_interval, bootstrap_indices
from tailforge.gen.core.checks import PositiveInt, check_fields
from tailforge.gen.core.device import default_device
from tailforge.gen.core.images import float_to_uint8
from tailforge.gen.diffusion.config import SAMPLERS, SamplingConfig
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.models.accelerate import AccelerationConfig, accelerate
from tailforge.gen.models.classifiers import embed
from tailforge.gen.models.diffusion import DiffusionModel

#: the papers' baseline: DDPM over every trained timestep
REFERENCE_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class QualitySpeedOptions:
    """`tailforge bench quality-speed --set FIELD=VALUE`."""

    model: str = "demo-out/models/diffusion"  # trained diffusion model folder (`tailforge demo` writes this one)
    classifier: str = "demo-out/models/reference-classifier"  # evaluation classifier: the FD's feature space
    dataset: str = "digits"  # real dataset spec; its test split is the FD's reference
    num_samples: PositiveInt = 256  # images per setting (--quick: at most 48)
    batch_size: PositiveInt = 128  # images per sampling batch, both sides
    compile: bool = True  # our U-Net compiled (gen.models.accelerate); false: eager, like the pipeline's
    channels_last: bool = False  # our U-Net in channels_last (gen.models.accelerate)
    resamples: PositiveInt = 500  # bootstrap resamples of every FD interval

    def __post_init__(self):
        check_fields(self)


def step_grid(sampler: str, quick: bool, max_steps: int) -> list[int]:
    """Step counts swept for `sampler`: ancestral DDPM up to the full chain, the others (ODE and
    multistep solvers, which converge in far fewer steps) up to 100."""
    if sampler == "ddpm":
        grid = (10, 50, 250, 1000) if quick else (5, 10, 20, 50, 100, 250, 1000)
    else:
        grid = (5, 10, 20) if quick else (5, 10, 20, 50, 100)
    return [steps for steps in grid if steps <= max_steps]


# ----------------------------------------------------------------------------- Frechet intervals


def frechet_draws(features: np.ndarray, real: tuple[np.ndarray, np.ndarray], index: np.ndarray) -> np.ndarray:
    """FD against the real statistics (mean, covariance) of each row of `index` (rows of item
    indices into `features`); one value per row."""
    return np.array([frechet_distance(*gaussian_statistics(torch.from_numpy(features[rows])), *real)
                     for rows in np.atleast_2d(index)])


def frechet_interval(features: np.ndarray, real: tuple[np.ndarray, np.ndarray], *, resamples: int,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """FD of `features` against the real statistics, with the bias-shifted bootstrap interval over
    the generated items (eval.stats.bias_shifted_interval: resampling duplicates images, which
    raises every resampled FD)."""
    everything = np.arange(len(features))
    draws = frechet_draws(features, real, bootstrap_indices(len(features), resamples, seed))
    return bias_shifted_interval(frechet_draws(features, real, everything)[0], draws, level=level, floor=0.0,
                                 method=f"bias-shifted bootstrap over generated images ({resamples} resamples)",
                                 items=len(features))


def frechet_difference(a: np.ndarray, b: np.ndarray, real: tuple[np.ndarray, np.ndarray], *, resamples: int,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """FD(b) - FD(a) against the same real statistics, with a two-sample bias-shifted bootstrap
    interval (the two draws' biases differ with the sets' spreads): the two sets are independent draws (different noise), so each is resampled on its
    own (the same seeds for every `b` compared with one `a`)."""
    draws = (frechet_draws(b, real, bootstrap_indices(len(b), resamples, seed + 1))
             - frechet_draws(a, real, bootstrap_indices(len(a), resamples, seed)))
    estimate = frechet_draws(b, real, np.arange(len(b)))[0] - frechet_draws(a, real, np.arange(len(a)))[0]
    return bias_shifted_interval(estimate, draws, level=level, items=len(a) + len(b),
                                 method=f"two-sample bias-shifted bootstrap ({resamples} resamples)")


# ----------------------------------------------------------------------------- sampling, both sides


class LabelledUNet(nn.Module):
    """A class-conditional ``UNet2DModel`` as diffusers' pipelines call it, ``unet(x, t)``: the
    batch's class labels (``labels``, set before each batch) are added, so the pipeline samples
    what our sampler samples from the same weights. Config, dtype and device are the U-Net's."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.labels: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, x: Tensor, t: Tensor | int, **kwargs: Any):
        return self.unet(x, t, class_labels=self.labels, **kwargs)


def batches(num: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(num, start + batch_size))) for start in range(0, num, batch_size)]


def labels_for(model: DiffusionModel, indices: list[int]) -> Tensor | None:
    """Class-balanced labels for a conditional model (as generation jobs use), None otherwise."""
    return balanced_labels(indices, model.meta.num_classes)


def sample_ours(model: DiffusionModel, sampling: SamplingConfig, num: int, batch_size: int) -> tuple[Tensor, float]:
    """`num` uint8 images from our sampler (seed 0, the jobs' per-sample noise) and the wall seconds."""
    started = time.perf_counter()
    images = [generate_batch(model, sampling, 0, indices, labels_for(model, indices))
              for indices in batches(num, batch_size)]
    return torch.cat(images), time.perf_counter() - started


def sample_pipeline(pipe: DDPMPipeline, model: DiffusionModel, steps: int, num: int,
                    batch_size: int) -> tuple[Tensor, float]:
    """`num` uint8 images from diffusers' DDPMPipeline (its own generator, seed 0) and the wall seconds."""
    generator = torch.Generator(model.device).manual_seed(0)
    started = time.perf_counter()
    images = []
    for indices in batches(num, batch_size):
        labels = labels_for(model, indices)
        pipe.unet.labels = None if labels is None else labels.to(model.device)
        out = pipe(batch_size=len(indices), num_inference_steps=steps, generator=generator, output_type="pt").images
        images.append(float_to_uint8(out * 2 - 1).cpu())  # the pipeline returns [0, 1]
    return torch.cat(images), time.perf_counter() - started


def make_pipeline(model: DiffusionModel) -> DDPMPipeline:
    """diffusers' DDPMPipeline on the model's eager U-Net and its own training scheduler."""
    scheduler_dir = Path(model.path) / "scheduler"
    scheduler = DDPMScheduler.from_pretrained(scheduler_dir) if scheduler_dir.is_dir() else DDPMScheduler()
    pipe = DDPMPipeline(unet=LabelledUNet(model.denoiser.eps_model.unet), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the sweep


def quality_speed(model: DiffusionModel, classifier: nn.Module, real: Tensor, *, num: int, batch_size: int,
                  grids: dict[str, list[int]], reference_steps: int, acceleration: AccelerationConfig,
                  resamples: int) -> dict[str, Any]:
    """The sweep and its headline (the module docstring); `grids` maps sampler names to step counts."""
    real_stats = gaussian_statistics(embed(classifier, real))
    ours_model = accelerate(model, acceleration)
    compile_seconds = 0.0
    if acceleration.compile:  # compile every batch shape the sweep uses, untimed, and report it apart
        started = time.perf_counter()
        for size in sorted({len(b) for b in batches(num, batch_size)}):
            sample_ours(ours_model, SamplingConfig(sampler="ddim", steps=2), size, batch_size)
        compile_seconds = time.perf_counter() - started

    pipe = make_pipeline(model)
    images, seconds = sample_pipeline(pipe, model, reference_steps, num, batch_size)
    reference_features = embed(classifier, images).double().numpy()
    reference = {"sampler": "diffusers DDPMPipeline", "steps": reference_steps, "evals_per_sample": reference_steps,
                 "wall_s_per_sample": seconds / num,
                 "frechet_distance": frechet_interval(reference_features, real_stats, resamples=resamples).as_dict()}

    rows = []
    for sampler, grid in grids.items():
        for steps in grid:
            sampling = SamplingConfig(sampler=sampler, steps=steps)
            images, seconds = sample_ours(ours_model, sampling, num, batch_size)
            features = embed(classifier, images).double().numpy()
            difference = frechet_difference(reference_features, features, real_stats, resamples=resamples)
            rows.append({"sampler": sampler, "steps": steps, "evals_per_sample": sampling.evals_per_sample(),
                         "wall_s_per_sample": seconds / num,
                         "frechet_distance": frechet_interval(features, real_stats, resamples=resamples).as_dict(),
                         "difference_vs_pipeline": difference.as_dict(),
                         "not_worse_than_pipeline": difference.low <= 0})
    # "not shown worse" alone accepts any setting when N is small (wide intervals); a match must also
    # have its FD inside the pipeline's own 95 % interval
    matched = [row for row in rows if row["not_worse_than_pipeline"]
               and row["frechet_distance"]["estimate"] <= reference["frechet_distance"]["high"]]
    headline: dict[str, Any] = {"criterion": "cheapest setting whose FD - FD(pipeline) interval does not lie "
                                             "wholly above 0 (95 % two-sample bootstrap) and whose FD is at most "
                                             "the upper end of the pipeline's FD interval"}
    if matched:
        fastest = min(matched, key=lambda row: row["wall_s_per_sample"])
        fewest = min(matched, key=lambda row: (row["evals_per_sample"], row["wall_s_per_sample"]))
        headline.update({
            "fastest_matched": {k: fastest[k] for k in ("sampler", "steps", "evals_per_sample", "wall_s_per_sample")},
            "fewest_evals_matched": {k: fewest[k] for k in ("sampler", "steps", "evals_per_sample")},
            "ratio_pipeline_over_ours_wall_per_sample": round(reference["wall_s_per_sample"]
                                                              / fastest["wall_s_per_sample"], 2),
            "ratio_pipeline_over_ours_evals": round(reference_steps / fewest["evals_per_sample"], 2)})
    return {"num_samples": num, "batch_size": batch_size, "real_test_images": len(real), "ours": acceleration.label(),
            "pipeline": "diffusers DDPMPipeline, eager U-Net, same weights and labels",
            "compile_seconds": round(compile_seconds, 1), "reference": reference, "rows": rows, "headline": headline}


def plot(result: dict[str, Any], path: Path) -> None:
    """FD (with its interval) against evaluations and against wall time per sample, one line per
    sampler, the pipeline's point and interval as a band; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from tailforge.eval.figures import save_png_atomic

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    reference = result["reference"]
    ref_fd = reference["frechet_distance"]
    for ax, key, label in ((axes[0], "evals_per_sample", "network evaluations per sample"),
                           (axes[1], "wall_s_per_sample", "wall seconds per sample")):
        for sampler in dict.fromkeys(row["sampler"] for row in result["rows"]):
            rows = [row for row in result["rows"] if row["sampler"] == sampler]
            fd = np.array([[r["frechet_distance"]["estimate"], r["frechet_distance"]["low"],
                            r["frechet_distance"]["high"]] for r in rows])
            # an interval cut at 0 can end above a round-off estimate: its bar then ends at the point
            ax.errorbar([r[key] for r in rows], fd[:, 0], yerr=np.clip([fd[:, 0] - fd[:, 1], fd[:, 2] - fd[:, 0]], 0, None),
                        marker="o", markersize=3, capsize=2, label=f"ours {sampler}")
        ax.axhspan(ref_fd["low"], ref_fd["high"], color="0.85", zorder=0)
        ax.errorbar([reference[key]], [ref_fd["estimate"]], yerr=np.clip([[ref_fd["estimate"] - ref_fd["low"]],
                                                                          [ref_fd["high"] - ref_fd["estimate"]]], 0, None),
                    marker="s", color="k", capsize=3, label=f"diffusers DDPMPipeline {reference['steps']}")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="Frechet distance (classifier features)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['num_samples']} samples per point vs {result['real_test_images']} real test images; "
                 "bars: 95 % bootstrap interval; grey: the pipeline's interval", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    save_png_atomic(Image.open(buffer), path)


@benchmark("quality-speed", "FD vs network evaluations and wall time for every sampler and step count; headline: "
                            "wall time per sample at the FD of diffusers' DDPMPipeline-1000 (goal >= 20x)",
           options=QualitySpeedOptions)
def bench_quality_speed(quick: bool, workdir: Path, options: QualitySpeedOptions) -> dict[str, Any]:
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import load_classifier
    from tailforge.gen.models.diffusion import load_diffusion_model

    for what, folder in (("model", options.model), ("classifier", options.classifier)):
        if not Path(folder).is_dir():
            raise BenchmarkUnavailable(f"quality-speed needs a trained {what} at {folder}: run `tailforge demo` "
                                       f"or pass --set {what}=FOLDER")
    device = default_device()
    model = load_diffusion_model(options.model, device)
    classifier, _ = load_classifier(options.classifier, device)
    real = load_dataset(options.dataset, "test").images
    num = min(options.num_samples, 48) if quick else options.num_samples
    max_steps = len(model.denoiser.train_sigmas)
    result = quality_speed(model, classifier, real, num=num, batch_size=options.batch_size,
                           grids={name: step_grid(name, quick, max_steps) for name in SAMPLERS},
                           reference_steps=min(REFERENCE_STEPS, max_steps),
                           acceleration=AccelerationConfig(channels_last=options.channels_last,
                                                           compile=options.compile),
                           resamples=options.resamples)
    plot(result, workdir / "quality-speed.png")
    return {"model": options.model, "classifier": options.classifier, "dataset": options.dataset,
            "device": device, "plot": str(workdir / "quality-speed.png"), **result}
