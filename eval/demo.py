"""The embedded default (`tailforge demo`, `make demo`): the pipeline end to end on digits.

Each stage writes into its own folder under --out and is skipped (or resumed) when its output is
already there, so a second run reuses the trained models and recorded shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from ..gen.baseline import BaselineConfig, BaselineSource, SamplingConfig
from ..gen.checkpoint import config_dict, load_diffusion_model, read_json
from ..gen.classifier_nets import CLASSIFIER_CONFIG, load_classifier, predict_logits
from ..gen.datasets import load_dataset
from ..gen.jobs import run_job
from ..gen.shards import plan_shards
from ..train.classifier import ClassifierTrainConfig, train_classifier
from ..train.diffusion import DiffusionTrainConfig, train_diffusion
from .accuracy import accuracy_report


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`tailforge demo`."""

    out: str = "demo-out"  # output folder (models, shards, summary)
    dataset: str = "digits"  # the embedded default dataset
    diffusion_steps: int = 1200  # diffusion training steps (about 6 minutes on 2 CPU cores)
    num_samples: int = 500  # baseline samples
    sampler: str = "ddim"  # sampler for the baseline shards
    sampling_steps: int = 50  # its steps
    actors: int = 2  # Ray actors for generation
    reference_classifier: str = "tinycnn_wide"  # independent classifier that checks the samples


def _cached_classifier(config: ClassifierTrainConfig, out: Path):
    if (out / CLASSIFIER_CONFIG).is_file() and read_json(out / CLASSIFIER_CONFIG).get("train_config") == config_dict(config):
        model, saved = load_classifier(out)
        return model, saved["test_accuracy"]
    return train_classifier(config, out)


def run_demo(config: DemoConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()

    print(f"[1/3] diffusion model on {config.dataset} ({config.diffusion_steps} steps) -> {out / 'diffusion'}")
    train_diffusion(DiffusionTrainConfig(dataset=config.dataset, steps=config.diffusion_steps), out / "diffusion")
    timings["diffusion"] = time.perf_counter() - started

    print(f"[2/3] reference classifier {config.reference_classifier} -> {out / 'reference_classifier'}")
    classifier, test_accuracy = _cached_classifier(
        ClassifierTrainConfig(dataset=config.dataset, model=config.reference_classifier), out / "reference_classifier")
    timings["classifier"] = time.perf_counter() - started - sum(timings.values())

    shards = out / "shards" / "baseline"
    print(f"[3/3] {config.num_samples} baseline samples ({config.sampler}, {config.sampling_steps} steps) "
          f"on {config.actors} Ray actors -> {shards}")
    baseline = BaselineConfig(model=str(out / "diffusion"), num=config.num_samples,
                              sampling=SamplingConfig(sampler=config.sampler, steps=config.sampling_steps),
                              shard_size=max(1, config.num_samples // 4))
    meta = load_diffusion_model(baseline.model).meta
    run_job(shards, config_dict(baseline), plan_shards(baseline.job, baseline.num, baseline.shard_size, baseline.seed),
            functools.partial(BaselineSource, baseline), actors=config.actors,
            manifest_extra={"num_classes": meta.num_classes, "class_names": list(meta.class_names)})
    timings["generation"] = time.perf_counter() - started - sum(timings.values())

    samples = load_dataset(f"shards:{shards}", "train")
    agreement = accuracy_report(predict_logits(classifier, samples.images), samples.labels, samples.info.num_classes)
    summary = {
        "config": config_dict(config),
        "reference_classifier_test_accuracy": test_accuracy,
        "baseline_label_agreement": agreement["top1"],
        "baseline_per_class_agreement": agreement["per_class"],
        "paths": {"diffusion": str(out / "diffusion"), "reference_classifier": str(out / "reference_classifier"),
                  "baseline_shards": str(shards)},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"{'reference classifier test accuracy':<42}{test_accuracy:>8.3f}")
    print(f"{'samples assigned to their requested class':<42}{agreement['top1']:>8.3f}")
    print(f"{'total seconds':<42}{sum(timings.values()):>8.1f}")
    print(f"\nshards: {shards}\nsummary: {out / 'summary.json'}")
    return summary
