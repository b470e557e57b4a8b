"""Classifier training on Ray Train: ``TorchTrainer`` with one DDP rank per worker, on the local
Ray instance or a cluster (``--workers N``, ``--address`` / $RAY_ADDRESS).

Each worker runs the same per-rank loop as a single-process run (train/classifier.py
:func:`train_rank`): its own :class:`MixedStream` share (split by world rank, then by loader
worker), the model wrapped by ``ray.train.torch.prepare_model`` (DDP; gradients all-reduced), the
per-epoch figures summed over ranks. Rank 0 evaluates and writes checkpoints, the log and the final
classifier to OUT, so OUT (and every shard set) must be a path all nodes see, as for generation
jobs. The global batch is split evenly across ranks, so the learning-rate schedule and the number
of steps are those of a one-process run. A worker group that fails is restarted by Ray Train
(``max_failures``) and every rank resumes from the newest checkpoint in OUT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model

from tailforge.gen.jobs.ray import connect
from tailforge.train.classifier import ClassifierTrainConfig, RankContext, Stage, train_rank


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function TorchTrainer runs (the process group is already set up). Relative
    paths (dataset spec, shard sets) mean what they mean to the driver wherever its working
    directory exists on the worker's node."""
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    context = ray.train.get_context()
    ctx = RankContext(device=get_device(), rank=context.get_world_rank(), world_size=context.get_world_size(),
                      wrap=prepare_model, report=ray.train.report)
    train_rank(loop_config["config"], loop_config["out"], ctx, progress=loop_config["progress"],
               stage=loop_config["stage"])


def scaling_for(workers: int) -> ScalingConfig:
    """One GPU per worker when the cluster has one for each, else the CPUs split evenly."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= workers:
        return ScalingConfig(num_workers=workers, use_gpu=True)
    cpus = max(1, int(resources.get("CPU", 1)) // workers)
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus})


def train_on_ray(config: ClassifierTrainConfig, out: str | Path, *, address: str | None = None,
                 progress: bool = True, stage: Stage | None = None, max_failures: int = 2) -> None:
    """Run ``config`` on ``config.workers`` Ray Train workers; the classifier lands in ``out``.
    Ray Train's own run state (not the checkpoints, which are ours) goes to OUT/ray_train."""
    out = Path(out).resolve()
    connect(address)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "out": str(out), "progress": progress, "stage": stage,
                           "cwd": os.getcwd()},
        scaling_config=scaling_for(config.workers),
        run_config=RunConfig(name="train", storage_path=str(out / "ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )  # TorchConfig's default backend: nccl with GPUs, gloo without
    trainer.fit()
