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
from typing import Any, Callable

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model

from tailforge.gen.jobs.ray import connect

#: rank_loop(device=, rank=, world_size=, wrap=, report=): one rank's training run, given where it
#: runs (the fields of train/classifier.py's RankContext); it is passed in, not imported, so that
#: this module does not depend on the trainer that calls it
RankLoop = Callable[..., None]


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function TorchTrainer runs (the process group is already set up). Relative
    paths (dataset spec, shard sets) mean what they mean to the driver wherever its working
    directory exists on the worker's node."""
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    context = ray.train.get_context()
    loop_config["rank_loop"](device=get_device(), rank=context.get_world_rank(), world_size=context.get_world_size(),
                             wrap=prepare_model, report=ray.train.report)


def scaling_for(workers: int) -> ScalingConfig:
    """One GPU per worker when the cluster has one for each, else the CPUs split evenly."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= workers:
        return ScalingConfig(num_workers=workers, use_gpu=True)
    cpus = max(1, int(resources.get("CPU", 1)) // workers)
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus})


def train_on_ray(rank_loop: RankLoop, workers: int, out: str | Path, *, address: str | None = None,
                 max_failures: int = 2) -> None:
    """Run ``rank_loop`` on ``workers`` Ray Train workers, one DDP rank each. Ray Train's own run
    state (not the checkpoints, which the loop writes) goes to OUT/ray_train."""
    out = Path(out).resolve()
    connect(address)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"rank_loop": rank_loop, "cwd": os.getcwd()},
        scaling_config=scaling_for(workers),
        run_config=RunConfig(name="train", storage_path=str(out / "ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )  # TorchConfig's default backend: nccl with GPUs, gloo without
    trainer.fit()
