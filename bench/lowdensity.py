"""`tailforge bench lowdensity-cost`: compute per accepted low-density sample, rejection sampling
with the baseline sampler vs alpha/beta-guided sampling (Sehwag et al. 2022, Sec. 4.2, Table 1).

Both sides generate from the same seeds and are filtered the same way: a sample is accepted into a
hardness bin when its hardness, measured by an independent evaluation classifier (not the guidance
one) with class Gaussians of the real training split, lies in the bin. Bin edges are high
percentiles of the real training data's own hardness, computed out of fold (eval.density.
crossfit_hardness) so the real images are scored as a new sample would be; every bin is bounded,
the last one by ``top_percentile`` of the real data (an open-ended top bin would accept samples
harder than any real image, which is leaving the data, not sampling its tail). Each side pays for
every sample it generated, including those that miss the bin:

    cost per accepted sample in bin b = (wall seconds or model evaluations of the whole run) / (accepted in b)
    ratio = rejection (baseline) cost / guided cost         (Table 1: 1.1x, 2.8x, 6.0x)

Table 1 is wall time, so "seconds" is the headline and counts every network pass each side needs:
the rejection side's U-Net passes plus the evaluation classifier scoring every candidate (that is
how rejection decides), the guided side's U-Net passes plus the guidance networks' forward and
backward passes. U-Net evaluations alone are the second measure. Each ratio carries a 95 %
interval from a two-sample bootstrap over the generated samples (acceptance is what varies; the
cost per generated sample is taken as measured). A bin with no accepted sample on one side has no
finite cost there; its ratio is reported as null and the bin as not filled.
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
from tailforge.eval.config import DensityConfig
from tailforge.eval.density import check_independent, real_reference
from tailforge.eval.stats import bootstrap_indices
from tailforge.gen.core.files import config_dict
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.methods.config import GuidanceConfig
from tailforge.gen.methods.lowdensity import generate_guided_batch, hardness
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
    percentiles: tuple[float, ...] = (90.0, 97.0, 99.5)  # lower bin edges: percentiles of real training hardness
    top_percentile: float = 100.0  # upper edge of the last bin (100: the hardest real training image)
    resamples: int = 2000  # bootstrap resamples for each ratio's interval
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


def _ratio_interval(inside: dict[str, np.ndarray], per_sample: dict[str, float], resamples: int,
                    seed: int) -> list[float | None]:
    """95 % interval of (rejection cost per accepted) / (guided cost per accepted) in one bin: each side's
    samples resampled with replacement, its cost per generated sample held at the measured value. A
    resample in which a side accepts nothing has no finite ratio; the interval is then open on that end
    (None)."""
    rates = {}
    for k, (side, hits) in enumerate(sorted(inside.items())):
        rates[side] = hits.astype(np.float64)[bootstrap_indices(len(hits), resamples, seed + k)].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (per_sample["baseline"] / rates["baseline"]) / (per_sample["guided"] / rates["guided"])
    ratios = np.where(np.isnan(ratios), np.inf, ratios)
    # the outer order statistics, no interpolation (ratios may be infinite)
    low, high = np.quantile(ratios, 0.025, method="lower"), np.quantile(ratios, 0.975, method="higher")
    return [round(float(v), 3) if np.isfinite(v) else None for v in (low, high)]


def bin_costs(edges: list[float], scores: dict[str, np.ndarray], cost: dict[str, dict[str, float]],
              faithful: dict[str, np.ndarray] | None = None, *, resamples: int = 2000,
              seed: int = 0) -> list[dict[str, Any]]:
    """Per bin [edges[i], edges[i+1]) (the last one closed, [edges[-2], edges[-1]]): accepted counts,
    acceptance rates, cost per accepted sample for every cost measure of each side, and rejection /
    guided ratios with their bootstrap intervals. A sample above the top edge is in no bin.
    ``faithful`` (per side, one bool per sample: the evaluation classifier assigns it to the class it
    was generated for) adds the fraction of each bin's accepted samples that are, so a bin filled
    with off-class samples shows as such; it does not change what is accepted."""
    rows = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        row: dict[str, Any] = {"low": round(low, 4), "high": round(high, 4)}
        inside = {side: (values >= low) & ((values <= high) if last else (values < high))
                  for side, values in scores.items()}
        for side, hits in inside.items():
            accepted = int(hits.sum())
            row[side] = {"accepted": accepted, "acceptance": round(accepted / len(hits), 5),
                         **({"faithful": round(float(faithful[side][hits].mean()), 4) if accepted else None}
                            if faithful is not None else {}),
                         **{f"{measure}_per_accepted": (round(total / accepted, 5) if accepted else None)
                            for measure, total in cost[side].items()}}
        for measure in sorted(cost["baseline"].keys() & cost["guided"].keys()):
            rejection, guided = row["baseline"][f"{measure}_per_accepted"], row["guided"][f"{measure}_per_accepted"]
            row[f"ratio_{measure}"] = round(rejection / guided, 3) if rejection and guided else None
            per_sample = {side: cost[side][measure] / len(scores[side]) for side in ("baseline", "guided")}
            row[f"ratio_{measure}_interval"] = _ratio_interval(inside, per_sample, resamples, seed)
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
    edges = np.percentile(reference.train_hardness.numpy(), [*config.percentiles, config.top_percentile]).tolist()

    guidance.evals = guidance.unet_evals = 0
    generated = _timed_generation({
        "baseline": (config.num_baseline,
                     lambda idx, lab: generate_batch(model, config.sampling, config.seed, idx, lab)),
        "guided": (config.num_guided,
                   lambda idx, lab: generate_guided_batch(model, guidance, config.sampling, config.guide, config.seed,
                                                          idx, lab)),
    }, config.batch_size, model.meta.num_classes)
    base_seconds, guided_seconds = generated["baseline"][2], generated["guided"][2]
    # rejection sampling decides by scoring every candidate: that pass is part of its cost
    scores, scoring = {}, {}
    for side, (images, labels, _) in generated.items():
        start = time.perf_counter()
        scores[side] = hardness(embed(net, images), labels, reference.gaussians).detach().numpy()
        scoring[side] = time.perf_counter() - start
    scoring_seconds = scoring["baseline"]
    evals = config.sampling.evals_per_sample()
    cost = {"baseline": {"seconds": base_seconds + scoring_seconds, "unet_evals": config.num_baseline * evals},
            "guided": {"seconds": guided_seconds, "unet_evals": config.num_guided * evals,
                       "all_evals": config.num_guided * evals + guidance.evals + guidance.unet_evals}}
    faithful = {side: (predict_logits(net, images).argmax(1) == labels).numpy()
                for side, (images, labels, _) in generated.items()}
    bins = bin_costs(edges, scores, cost, faithful, resamples=config.resamples, seed=config.seed)
    filled = [b for b in bins if b["filled"]]
    return {
        "config": config_dict(config), "eval_classifier_model": net_config.get("model"),
        "guidance_hash": guidance.info.get("guidance_hash"), "guidance_input": guidance.input,
        "model_hash": model.model_hash, "thresholds": [round(e, 4) for e in edges],
        "median_hardness": {side: round(float(np.median(v)), 4) for side, v in scores.items()},
        "real_train_median_hardness": round(float(reference.train_hardness.median()), 4),
        "seconds_per_sample": {"baseline": round(base_seconds / config.num_baseline, 5),
                               "guided": round(guided_seconds / config.num_guided, 5)},
        "scoring_seconds_per_candidate": round(scoring_seconds / config.num_baseline, 6),
        "guidance_evals": guidance.evals, "bins": bins,
        "hardest_filled_bin_ratio_seconds": filled[-1]["ratio_seconds"] if filled else None,
        "hardest_filled_bin_ratio_seconds_interval": filled[-1]["ratio_seconds_interval"] if filled else None,
        "hardest_filled_bin_ratio_unet_evals": filled[-1]["ratio_unet_evals"] if filled else None,
    }


def _bench_models(quick: bool, workdir: Path) -> tuple[str, str, str]:
    """The diffusion model, guidance folder and evaluation classifier: the folders named by the
    environment variables, else trained into `workdir` once and reused by later runs."""
    from tailforge.train.classifier import train_classifier
    from tailforge.train.config import ClassifierTrainConfig, DiffusionTrainConfig, GuidanceTrainConfig
    from tailforge.train.diffusion import train_diffusion
    from tailforge.train.guidance import train_guidance

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


@benchmark("lowdensity-cost", "Sehwag et al. 2022 Table 1: compute per accepted sample per hardness bin, rejection sampling "
                              "with the baseline sampler vs alpha/beta-guided sampling (independent classifier bins)")
def bench_lowdensity_cost(quick: bool, workdir: Path) -> dict[str, Any]:
    model, guidance, classifier = _bench_models(quick, workdir)
    config = CostBenchConfig(model=model, guidance=guidance, eval_classifier=classifier,
                             num_baseline=400 if quick else 2000, num_guided=200 if quick else 400,
                             sampling=SamplingConfig(steps=50 if quick else 100),
                             percentiles=(80.0, 90.0, 97.0) if quick else (90.0, 97.0, 99.5, 99.9))
    return lowdensity_cost(config)
