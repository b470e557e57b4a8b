"""`tailforge bench stream`: is the shard pipeline fast enough to keep the trainer busy?

Measured side by side in one run, on the same data, model and batch size:

* pipeline: samples/s the training input stream (train/streams.py: tar reading, shuffling,
  mixing, PNG decoding, collation) delivers with no model attached, with the default loader
  worker process and with the reading done in the training process;
* trainer: samples/s the trainer consumes when its batches come from memory (no I/O at all): the
  rate the pipeline has to beat;
* end to end: samples/s of the same training fed by the stream.

The data is digits' training split written to shards (as `train classifier` does) mixed 1 : 0.3
with a `gen baseline` shard set. The synthetic images come from a random-weight tiny U-Net (2 DDIM
steps): the pipeline's cost does not depend on what the pixels show, and noise-like images are the
slowest PNGs to decode, so this is the pipeline's worst case at this image size. The goal is a
pipeline rate at least 2x the trainer's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from tailforge.bench import benchmark
from tailforge.gen.core.device import default_device
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.gen.jobs.runner import run_config_job
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
from tailforge.gen.models.unet import build_unet
from tailforge.train.classifier import RankContext, build_stream, memory_batches, new_classifier, run_training
from tailforge.train.config import ClassifierTrainConfig, MixSource
from tailforge.train.streams import real_shard_root, write_real_shards


def _synthetic_shards(workdir: Path, num: int) -> Path:
    model_dir, shards = workdir / "random-unet", workdir / "baseline"
    if not (model_dir / "tailforge.json").is_file():
        torch.manual_seed(0)
        save_diffusion_model(model_dir, build_unet("tiny", image_size=8, channels=1, num_classes=10),
                             DDPMScheduler(num_train_timesteps=1000),
                             ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789")))
    config = BaselineConfig(model=str(model_dir), num=num, sampling=SamplingConfig(sampler="ddim", steps=2),
                            shard_size=250)
    run_config_job(shards, config, BaselineSource, num, actors=0, progress=False, manifest_extra={"num_classes": 10})
    return shards


def _rate(samples: int, seconds: float) -> float:
    return round(samples / seconds, 1)


@benchmark("stream", "shard-pipeline samples/s against the trainer's consumption rate, side by side (goal >= 2x)")
def bench_stream(quick: bool, workdir: Path) -> dict[str, Any]:
    epochs = 3 if quick else 10
    config = ClassifierTrainConfig(model="tinycnn_wide", epochs=epochs,
                                   mix=(MixSource("real", 1.0), MixSource("baseline", 0.3,
                                                                            str(_synthetic_shards(workdir, 500)))))
    out = workdir / "run"
    write_real_shards(config.dataset, real_shard_root(config.dataset, out))
    test = load_dataset(config.dataset, "test")
    device = default_device()
    result: dict[str, Any] = {"model": config.model, "batch_size": config.batch_size, "mix": "real=1.0,baseline=0.3",
                              "epochs": epochs, "device": str(device), "torch_threads": torch.get_num_threads()}

    # pipeline alone, with the default loader worker and in the training process: the whole run (worker
    # start-up included) and the steady rate after the first batch (what a long training run sees)
    for workers in sorted({config.loader_workers, 0}, reverse=True):
        stream = build_stream(dataclasses.replace(config, loader_workers=workers), out, test)
        started = time.perf_counter()
        batches = stream.batches()
        first = len(next(batches)["labels"])
        after_first = time.perf_counter()
        rest = sum(len(batch["labels"]) for batch in batches)
        ended = time.perf_counter()
        result[f"pipeline_samples_per_s_{workers}_loader_workers"] = _rate(first + rest, ended - started)
        result[f"pipeline_steady_samples_per_s_{workers}_loader_workers"] = _rate(rest, ended - after_first)
    stream = build_stream(config, out, test)
    result["samples_per_epoch"] = stream.steps_per_epoch * config.batch_size

    # the trainer fed from memory (no I/O): real training images in a fresh order every epoch
    train = load_dataset(config.dataset, "train")
    steps, make = memory_batches(train, config.batch_size, config.seed, epochs)
    model = new_classifier(config, test.info.num_classes, test.info.channels)
    started = time.perf_counter()
    run_training(config, model, make, steps, RankContext(device), progress=False)
    result["trainer_samples_per_s_from_memory"] = _rate(epochs * steps * config.batch_size,
                                                        time.perf_counter() - started)

    # the same training fed by the stream
    model = new_classifier(config, test.info.num_classes, test.info.channels)
    started = time.perf_counter()
    run_training(config, model, lambda start: stream.at(start, epochs).batches(), stream.steps_per_epoch,
                 RankContext(device), source_names=tuple(s.name for s in stream.sets), progress=False)
    result["trainer_samples_per_s_from_stream"] = _rate(epochs * stream.steps_per_epoch * config.batch_size,
                                                        time.perf_counter() - started)

    pipeline = result[f"pipeline_samples_per_s_{config.loader_workers}_loader_workers"]
    result["pipeline_over_trainer"] = round(pipeline / result["trainer_samples_per_s_from_memory"], 2)
    steady = result[f"pipeline_steady_samples_per_s_{config.loader_workers}_loader_workers"]
    result["pipeline_steady_over_trainer"] = round(steady / result["trainer_samples_per_s_from_memory"], 2)
    result["stream_training_over_memory_training"] = round(
        result["trainer_samples_per_s_from_stream"] / result["trainer_samples_per_s_from_memory"], 3)
    result["goal_pipeline_over_trainer"] = 2.0
    return result
