"""`tailforge bench lowdensity-cost`: compute per accepted low-density sample, rejection sampling
with the baseline sampler vs alpha/beta-guided sampling (seed 000, Sec. 4.2, Table 1).

Both sides generate from the same seeds and are filtered the same way: a sample is accepted into a
hardness bin when its hardness, measured by an independent evaluation classifier (not the guidance
one) with class Gaussians of the real training split, lies in the bin. Bin edges are high
percentiles of the real training data's own hardness, computed out of fold (eval.density.
crossfit_hardness) so the real images are scored as a new sample would be. Each side pays for
every sample it generated, including those that miss the bin:

    cost per accepted sample in bin b = (wall seconds or model evaluations of the whole run) / (accepted in b)
    ratio = rejection (baseline) cost / guided cost         (Table 1: 1.1x, 2.8x, 6.0x)

A bin with no accepted sample on one side has no finite cost there; its ratio is reported as null
and the bin as not filled.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from tailforge.bench import benchmark
from tailforge.eval.density import DensityConfig, check_independent, real_reference
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.diffusion.samplers import SamplingConfig, balanced_labels, generate_batch
from tailforge.gen.methods.lowdensity import GuidanceConfig, generate_guided_batch, hardness
from tailforge.gen.models.classifiers import embed, load_classifier, predict_logits
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.gen.models.guidance import load_guidance

#: environment variables naming existing folders for the benchmark (else it trains its own, cached)
ENV_MODEL, ENV_GUIDANCE, ENV_CLASSIFIER = ("TAILFORGE_LOWDENSITY_MODEL", "TAILFORGE_LOWDENSITY_GUIDANCE",
                                           "TAILFORGE_LOWDENSITY_EVAL_CLASSIFIER")


@dataclasses.dataclass(frozen=True)
class CostBenchConfig:
    """One rejection-vs-guided cost comparison; copied into the benchmark JSON."""

    model: str  # diffusion model folder
    guidance: str  # guidance folder (tailforge train guidance)
    eval_classifier: str  # independent evaluation classifier folder (tailforge train classifier)
    dataset: str = "digits"  # real data: training split for the Gaussians and the thresholds
    num_baseline: int = 600  # baseline samples drawn for rejection sampling
    num_guided: int = 300  # guided samples (the first num_guided seeds of the baseline run)
    sampling: SamplingConfig = SamplingConfig(steps=100)  # both sides' sampler (paper: 250 DDPM steps)
    guide: GuidanceConfig = GuidanceConfig()  # alpha, beta, tau of the guided side (paper: 0.5, 0.5)
    percentiles: tuple[float, ...] = (90.0, 97.0, 99.5)  # bin edges: percentiles of real training hardness
    shrinkage: str = "ledoit_wolf"  # evaluation class covariances
    seed: int = 0  # job seed shared by both sides
    batch_size: int = 100  # samples per batch on both sides


def _timed_generation(sides: dict[str, tuple[int, Callable[[list[int], torch.Tensor], torch.Tensor]]],
                      batch_size: int, num_classes: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each side's `num` class-balanced samples from make_batch(indices, labels), one batch of each side
    in turn, so both sides run under the same machine load (on a shared machine, load that changes over
    the run would otherwise favour whichever side ran in the quieter period). Per side: (images,
    labels, wall seconds of its generation alone)."""
    images: dict[str, list[torch.Tensor]] = {side: [] for side in sides}
    labels: dict[str, list[torch.Tensor]] = {side: [] for side in sides}
    seconds = dict.fromkeys(sides, 0.0)
    longest = max(num for num, _ in sides.values())
    for first in tqdm(range(0, longest, batch_size), desc="rejection vs guided", unit="batch"):
        for side, (num, make_batch) in sides.items():
            if first >= num:
                continue
            indices = list(range(first, min(first + batch_size, num)))
            labels[side].append(balanced_labels(indices, num_classes))
            start = time.perf_counter()
            images[side].append(make_batch(indices, labels[side][-1]))
            seconds[side] += time.perf_counter() - start
    return {side: (torch.cat(images[side]), torch.cat(labels[side]), seconds[side]) for side in sides}


def bin_costs(edges: list[float], scores: dict[str, np.ndarray], cost: dict[str, dict[str, float]],
              faithful: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per bin [edges[i], edges[i+1]) (the last open-ended): accepted counts, acceptance rates, cost
    per accepted sample for every cost measure of each side, and rejection / guided ratios.
    ``faithful`` (per side, one bool per sample: the evaluation classifier assigns it to the class it
    was generated for) adds the fraction of each bin's accepted samples that are, so a bin filled
    with off-class samples shows as such; it does not change what is accepted."""
    bounds = list(edges) + [float("inf")]
    rows = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        row: dict[str, Any] = {"low": round(low, 4), "high": None if high == float("inf") else round(high, 4)}
        for side, values in scores.items():
            inside = (values >= low) & (values < high)
            accepted = int(inside.sum())
            row[side] = {"accepted": accepted, "acceptance": round(accepted / len(values), 5),
                         **({"faithful": round(float(faithful[side][inside].mean()), 4) if accepted else None}
                            if faithful is not None else {}),
                         **{f"{measure}_per_accepted": (round(total / accepted, 5) if accepted else None)
                            for measure, total in cost[side].items()}}
        for measure in cost["baseline"].keys() & cost["guided"].keys():
            rejection, guided = row["baseline"][f"{measure}_per_accepted"], row["guided"][f"{measure}_per_accepted"]
            row[f"ratio_{measure}"] = round(rejection / guided, 3) if rejection and guided else None
        row["filled"] = row["baseline"]["accepted"] > 0 and row["guided"]["accepted"] > 0
        rows.append(row)
    return rows


def lowdensity_cost(config: CostBenchConfig, *, device: str = "cpu") -> dict[str, Any]:
    """Generate both sides, measure, bin, and return every figure."""
    model = load_diffusion_model(config.model, device)
    guidance = load_guidance(config.guidance, device)
    # The bins must be measured by a network that did not guide (DESIGN.md), as in `eval density`.
    check_independent(config.eval_classifier, [{"guidance_classifier_sha256": guidance.info.get("classifier_sha256")}])
    net, net_config = load_classifier(config.eval_classifier, device)
    train = load_dataset(config.dataset, "train")
    reference = real_reference(embed(net, train.images), train.labels, train.info.num_classes,
                               DensityConfig(shrinkage=config.shrinkage))
    edges = np.percentile(reference.train_hardness.numpy(), config.percentiles).tolist()

    guidance.evals = 0
    generated = _timed_generation({
        "baseline": (config.num_baseline,
                     lambda idx, lab: generate_batch(model, config.sampling, config.seed, idx, lab)),
        "guided": (config.num_guided,
                   lambda idx, lab: generate_guided_batch(model, guidance, config.sampling, config.guide, config.seed,
                                                          idx, lab)),
    }, config.batch_size, model.meta.num_classes)
    base_seconds, guided_seconds = generated["baseline"][2], generated["guided"][2]
    evals = config.sampling.evals_per_sample()
    cost = {"baseline": {"seconds": base_seconds, "unet_evals": config.num_baseline * evals},
            "guided": {"seconds": guided_seconds, "unet_evals": config.num_guided * evals,
                       "all_evals": config.num_guided * evals + guidance.evals}}
    scores = {side: hardness(embed(net, images), labels, reference.gaussians).detach().numpy()
              for side, (images, labels, _) in generated.items()}
    faithful = {side: (predict_logits(net, images).argmax(1) == labels).numpy()
                for side, (images, labels, _) in generated.items()}
    bins = bin_costs(edges, scores, cost, faithful)
    filled = [b for b in bins if b["filled"]]
    return {
        "config": config_dict(config), "eval_classifier_model": net_config.get("model"),
        "guidance_hash": guidance.info.get("guidance_hash"), "guidance_input": guidance.input,
        "model_hash": model.model_hash, "thresholds": [round(e, 4) for e in edges],
        "median_hardness": {side: round(float(np.median(v)), 4) for side, v in scores.items()},
        "real_train_median_hardness": round(float(reference.train_hardness.median()), 4),
        "seconds_per_sample": {"baseline": round(base_seconds / config.num_baseline, 5),
                               "guided": round(guided_seconds / config.num_guided, 5)},
        "guidance_evals": guidance.evals, "bins": bins,
        "hardest_filled_bin_ratio_seconds": filled[-1]["ratio_seconds"] if filled else None,
        "hardest_filled_bin_ratio_unet_evals": filled[-1]["ratio_unet_evals"] if filled else None,
    }


def _bench_models(quick: bool, workdir: Path) -> tuple[str, str, str]:
    """The diffusion model, guidance folder and evaluation classifier: the folders named by the
    environment variables, else trained into `workdir` once and reused by later runs."""
    from tailforge.train.classifier import ClassifierTrainConfig, train_classifier
    from tailforge.train.diffusion import DiffusionTrainConfig, train_diffusion
    from tailforge.train.guidance import GuidanceTrainConfig, train_guidance

    model = os.environ.get(ENV_MODEL) or str(workdir / ("ddpm-quick" if quick else "ddpm"))
    if not os.environ.get(ENV_MODEL) and not (Path(model) / "tailforge.json").is_file():
        train_diffusion(DiffusionTrainConfig(dataset="digits", steps=600 if quick else 2000), model)
    classifier = os.environ.get(ENV_CLASSIFIER) or str(workdir / "eval-tinycnn_wide")
    if not os.environ.get(ENV_CLASSIFIER) and not (Path(classifier) / "classifier.json").is_file():
        train_classifier(ClassifierTrainConfig(dataset="digits", model="tinycnn_wide", epochs=10 if quick else 30),
                         classifier)
    guidance = os.environ.get(ENV_GUIDANCE) or str(workdir / ("guidance-quick" if quick else "guidance"))
    if not os.environ.get(ENV_GUIDANCE) and not (Path(guidance) / "guidance.json").is_file():
        train_guidance(GuidanceTrainConfig(dataset="digits", model=model, epochs=10 if quick else 30,
                                           synthetic=SamplingConfig(sampler="ddim", steps=20) if quick
                                           else SamplingConfig(steps=100)), guidance)
    return model, guidance, classifier


@benchmark("lowdensity-cost", "seed 000 Table 1: compute per accepted sample per hardness bin, rejection sampling "
                              "with the baseline sampler vs alpha/beta-guided sampling (independent classifier bins)")
def bench_lowdensity_cost(quick: bool, workdir: Path) -> dict[str, Any]:
    model, guidance, classifier = _bench_models(quick, workdir)
    config = CostBenchConfig(model=model, guidance=guidance, eval_classifier=classifier,
                             num_baseline=400 if quick else 2000, num_guided=200 if quick else 400,
                             sampling=SamplingConfig(steps=50 if quick else 100),
                             percentiles=(80.0, 90.0, 97.0) if quick else (90.0, 97.0, 99.5, 99.9))
    return lowdensity_cost(config)
