"""Sample sources: what one shard of a baseline, low-density or reconstruction job holds."""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError, NonFiniteError
from tailforge.gen.core.images import float_to_uint8, uint8_to_float
from tailforge.gen.core.noise import PerSampleNoise
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import ShardRecord, ShardSpec, encode_sample, sample_key
from tailforge.gen.data.shards.write import write_shard
from tailforge.gen.diffusion.denoiser import ClampDenoised
from tailforge.gen.diffusion.samplers import balanced_labels, generate_batch
from tailforge.gen.diffusion.schedules import sigma_at_step
from tailforge.gen.jobs.config import BaselineConfig, LowDensityConfig, ReconstructConfig, ShardJobConfig
from tailforge.gen.jobs.gate import ReplicaGate, replica_gate
from tailforge.gen.methods.config import GuidanceConfig
from tailforge.gen.methods.lowdensity import GuidanceModels, generate_guided_batch
from tailforge.gen.methods.reconstruct import chain_steps, reconstruct, t_re_steps
from tailforge.gen.models.diffusion import DiffusionModel, load_diffusion_model
from tailforge.gen.models.guidance import load_guidance


class SampleSource(Protocol):
    model_evals: int

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]: ...


SourceFactory = Callable[[], SampleSource]


def produce_shard(source: SampleSource, root: str, spec: ShardSpec, worker: str) -> ShardRecord:
    """Write one shard from `source` and describe it (sha256, size, time, model evaluations, and
    the replicas its memorization gate dropped, if it has one)."""
    # a source without a gate (train/streams.py's writer of real data) drops nothing: None
    gate: ReplicaGate | None = getattr(source, "gate", None)
    start_time, start_evals, start_dropped = time.perf_counter(), source.model_evals, gate.dropped if gate else 0
    try:
        sha256, size = write_shard(root, spec, source.samples(spec))
    except NonFiniteError as err:  # name the shard; nothing of it was published
        raise NonFiniteError(f"shard {spec.name} (samples {spec.start}..{spec.start + spec.count - 1}): {err}") from None
    return ShardRecord(name=spec.name, index=spec.index, start=spec.start, count=spec.count, sha256=sha256,
                       size_bytes=size, seconds=round(time.perf_counter() - start_time, 4),
                       model_evals=source.model_evals - start_evals, worker=worker,
                       replicas_dropped=gate.dropped - start_dropped if gate else None)


class ShardSource(abc.ABC):
    """The per-shard loop every source shares: the shard's samples in batches of
    ``config.batch_size``, each batch made by :meth:`batch`, its model evaluations counted and
    every sample encoded with the metadata all kinds record plus the batch's own per-row fields.
    With a memorization gate (gen/jobs/gate.py) the gate makes the shard instead, from the same
    batches, dropping and refilling replicas of the training set. A subclass sets ``config`` (a
    ShardJobConfig), ``model`` and ``evals_per_sample`` in its ``__init__``, and ``gate`` if its
    kind can be gated."""

    config: ShardJobConfig  # the job's config: its kind, job (key prefix), seed, batch_size
    model: DiffusionModel  # the diffusion model (its hash goes into every sample's json)
    evals_per_sample: int  # denoiser calls one sample costs
    model_evals: int = 0  # denoiser calls so far (produce_shard reads the difference per shard)
    gate: ReplicaGate | None = None  # the memorization gate; None: every sample is kept

    @abc.abstractmethod
    def batch(self, indices: list[int]) -> tuple[Tensor, list[int], list[dict[str, Any]]]:
        """(uint8 NCHW images, labels, per-row json fields) of global sample `indices` (sample
        i's noise comes from (seed, i))."""

    def counted_batch(self, indices: list[int]) -> tuple[Tensor, list[int], list[dict[str, Any]]]:
        """:meth:`batch`, its model evaluations counted."""
        out = self.batch(indices)
        self.model_evals += len(indices) * self.evals_per_sample
        return out

    def batches(self, spec: ShardSpec) -> Iterator[tuple[list[int], Tensor, list[int], list[dict[str, Any]]]]:
        """The shard's samples as (indices, images, labels, json fields), in order."""
        if self.gate is not None:
            yield self.gate.fill(spec, self.counted_batch, self.config.batch_size)
            return
        end = spec.start + spec.count
        for first in range(spec.start, end, self.config.batch_size):
            indices = list(range(first, min(first + self.config.batch_size, end)))
            yield indices, *self.counted_batch(indices)

    def samples(self, spec: ShardSpec) -> Iterator[dict[str, Any]]:
        cfg = self.config
        for indices, images, labels, rows in self.batches(spec):
            for row, index in enumerate(indices):
                yield encode_sample(sample_key(cfg.job, index), images[row].permute(1, 2, 0).numpy(), labels[row], {
                    "job": cfg.job, "kind": cfg.kind, "index": index, "label": labels[row], "seed": cfg.seed,
                    "model_hash": self.model.model_hash, **rows[row],
                })


class BaselineSource(ShardSource):
    """Produces a baseline shard's samples; held once per actor with its model loaded."""


    def __init__(self, config: BaselineConfig, device: str | None = None):
        self.config = config
        self.device = default_device(device)
        self.model = load_diffusion_model(config.model, self.device)
        self.evals_per_sample = config.sampling.evals_per_sample()
        self.gate = replica_gate(config.max_nn_ratio, config.train_dataset, self.model, config.num, self.device)

    def batch(self, indices: list[int]) -> tuple[Tensor, list[int], list[dict[str, Any]]]:
        cfg = self.config
        labels = balanced_labels(indices, self.model.meta.num_classes)
        images = generate_batch(self.model, cfg.sampling, cfg.seed, indices, labels)
        sampling = dataclasses.asdict(cfg.sampling)
        return images, labels.tolist() if labels is not None else [0] * len(indices), [sampling] * len(indices)


def guidance_meta(guidance: GuidanceModels, guide: GuidanceConfig, path: str) -> dict[str, Any]:
    """What every low-density sample records about its guidance (json fields)."""
    return {"alpha": guide.alpha, "beta": guide.beta, "tau": guide.tau, "guidance_loss": guide.loss,
            "guidance_scale_by": guide.scale_by,
            "guidance_input": guidance.input, "guidance": path, "guidance_hash": guidance.info.get("guidance_hash"),
            "guidance_classifier_sha256": guidance.info.get("classifier_sha256")}


class LowDensitySource(ShardSource):
    """Produces a low-density shard's samples; held once per actor with both models loaded."""


    def __init__(self, config: LowDensityConfig, device: str | None = None):
        self.config = config
        self.device = default_device(device)
        self.model = load_diffusion_model(config.model, self.device)
        if self.model.meta.num_classes is None:
            raise ConfigError(f"{config.model} is unconditional; low-density guidance needs a class-conditional model")
        self.guidance = load_guidance(config.guidance, self.device)
        self.meta = guidance_meta(self.guidance, config.guide, config.guidance)
        self.evals_per_sample = config.sampling.evals_per_sample()
        self.gate = replica_gate(config.max_nn_ratio, config.train_dataset, self.model, config.num, self.device)

    def batch(self, indices: list[int]) -> tuple[Tensor, list[int], list[dict[str, Any]]]:
        cfg = self.config
        labels = balanced_labels(indices, self.model.meta.num_classes)
        unet_evals = self.guidance.unet_evals
        images = generate_guided_batch(self.model, self.guidance, cfg.sampling, cfg.guide, cfg.seed, indices, labels)
        # "xt+x0" guidance denoises x_t again inside each guided step (Sastry et al. 2023): those passes count too
        self.model_evals += self.guidance.unet_evals - unet_evals
        # Hardness (Eq. 3) of the image as stored (uint8), under the guidance classifier.
        scores = self.guidance.sample_hardness(uint8_to_float(images).to(self.device), labels.to(self.device))
        common = {**dataclasses.asdict(cfg.sampling), **self.meta}
        return images, labels.tolist(), [{**common, "hardness": round(float(score), 5)} for score in scores]


class ReconstructSource(ShardSource):
    """Produces a reconstruction shard's samples; held once per actor with its model and the
    source images loaded. Sample i is the reconstruction of image i of the split."""


    def __init__(self, config: ReconstructConfig, device: str | None = None):
        self.config = config
        self.device = default_device(device)
        self.model = load_diffusion_model(config.model, self.device)
        self.data = load_dataset(config.dataset, config.split)
        meta = self.model.meta
        if (self.data.info.channels, self.data.info.image_size) != (meta.channels, meta.image_size):
            raise ConfigError(
                f"dataset {config.dataset!r} has {self.data.info.channels}x{self.data.info.image_size}px images but "
                f"the model in {config.model} makes {meta.channels}x{meta.image_size}px images")
        self.t = t_re_steps(config.t_re, len(self.model.denoiser.train_sigmas))
        # the sampler settings of this t_re's chain (the full chain's steps scaled by t_re)
        self.chain = dataclasses.replace(config.sampling, steps=chain_steps(config.sampling.steps, config.t_re, self.t)
                                         ) if self.t else None
        self.evals_per_sample = self.chain.evals_per_sample() if self.chain else 0
        self.sigma = float(sigma_at_step(self.model.denoiser.train_sigmas, torch.tensor(self.t)))
        self.denoiser = ClampDenoised(self.model.denoiser) if config.sampling.clip_denoised else self.model.denoiser

    def reconstruct_batch(self, indices: list[int]) -> Tensor:
        """Reconstructions of source images `indices` as uint8 NCHW (the sources themselves at t = 0)."""
        x0 = self.data.images[indices]
        if self.chain is None:
            return x0
        labels = self.data.labels[indices].to(self.device) if self.model.meta.num_classes is not None else None
        out = reconstruct(self.denoiser, uint8_to_float(x0).to(self.device), self.t, sampler=self.chain.sampler,
                          steps=self.chain.steps, labels=labels, rng=PerSampleNoise(self.config.seed, indices),
                          **self.chain.sampler_settings())
        return float_to_uint8(out).cpu()

    def batch(self, indices: list[int]) -> tuple[Tensor, list[int], list[dict[str, Any]]]:
        cfg = self.config
        common = {"source_dataset": cfg.dataset, "source_split": cfg.split, "t_re": cfg.t_re, "t": self.t,
                  "sigma": self.sigma, **dataclasses.asdict(cfg.sampling),
                  "chain_steps": self.chain.steps if self.chain else 0}
        return (self.reconstruct_batch(indices), [int(self.data.labels[index]) for index in indices],
                [{**common, "source_key": self.data.keys[index]} for index in indices])


def shard_set_name(t_re: float) -> str:
    """The folder and job-name suffix of the shard set for `t_re`: t_re_0p3, t_re_1, ... (no '.':
    webdataset splits a tar member's key from its extension at the first dot)."""
    return "t_re_" + f"{t_re:.6f}".rstrip("0").rstrip(".").replace(".", "p")


#: the source of each job kind (its config's ``kind``)
SOURCES: dict[str, SourceFactory] = {"baseline": BaselineSource, "lowdensity": LowDensitySource,
                                     "reconstruct": ReconstructSource}
