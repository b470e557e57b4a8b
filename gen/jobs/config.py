"""The generation jobs' configs (`tailforge gen baseline | lowdensity | reconstruct`), importable
without torch; what their shards hold is made in gen/jobs/sources.py."""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar

from tailforge.gen.core.checks import Check, NonNegativeInt, PositiveInt, check_fields
from tailforge.gen.diffusion.config import SamplingConfig, guided_sampler_spec
from tailforge.gen.methods.config import GuidanceConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardJobConfig:
    """What every generation job's config shares (keyword-only fields, after each job's own)."""

    kind: ClassVar[str]  # the job kind, every sample's json "kind": baseline | lowdensity | reconstruct
    job: str  # name used in shard and sample keys (each job defaults it to its kind)
    seed: NonNegativeInt = 0  # job seed: sample i's noise comes from (seed, i)
    shard_size: PositiveInt = 1000  # samples per shard
    batch_size: PositiveInt = 128  # samples per denoiser batch (does not change the samples' noise)

    def __post_init__(self):
        check_fields(self)

    def pins(self) -> dict[str, str]:
        """Content hashes of the folders the job reads, by config field: the model's weights
        hash (every subclass has a ``model`` field; the hash every sample records as
        ``model_hash``). The job folder pins them, so a resume with other weights is refused."""
        from tailforge.gen.models.diffusion import load_diffusion_model  # torch: only when a job runs

        return {"model": load_diffusion_model(self.model).model_hash}


#: a d1/d2 threshold: d1 <= d2, so 1 already drops every sample it can
NNRatio = Annotated[float, Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledJobConfig(ShardJobConfig):
    """What the jobs that sample new images share: the memorization gate (gen/jobs/gate.py). A
    reconstruction job has none: its samples are of training images by design."""

    # drop and refill samples whose nearest-neighbour ratio d1/d2 against the training set is below
    # this (replicas, Yoon et al. 2023: 1/3), and record every sample's ratio; 0 records without
    # dropping; unset: no gate
    max_nn_ratio: NNRatio | None = None
    # the gate's training set (dataset spec); unset: the one the model folder records it was trained on
    train_dataset: str | None = None

    def pins(self) -> dict[str, str]:
        """The model's hash and, with the gate, the hash of its training images (checked here,
        before the job folder is touched, so a bad training set leaves nothing behind)."""
        pins = super().pins()
        if self.max_nn_ratio is None:
            return pins
        from tailforge.gen.jobs.gate import gate_training_set, training_set_hash
        from tailforge.gen.models.diffusion import load_diffusion_model

        return {**pins, "train_dataset": training_set_hash(gate_training_set(self.train_dataset,
                                                                             load_diffusion_model(self.model)))}


@dataclasses.dataclass(frozen=True)
class BaselineConfig(SampledJobConfig):
    """`tailforge gen baseline`: plain sampling into shards."""

    kind: ClassVar[str] = "baseline"
    job: str = dataclasses.field(default=kind, kw_only=True)

    model: str  # diffusion model folder (tailforge train diffusion, or diffusers)
    num: PositiveInt  # number of samples
    sampling: SamplingConfig = SamplingConfig()  # sampler and steps


@dataclasses.dataclass(frozen=True)
class LowDensityConfig(SampledJobConfig):
    """`tailforge gen lowdensity`: guided sampling into shards."""

    kind: ClassVar[str] = "lowdensity"
    job: str = dataclasses.field(default=kind, kw_only=True)

    model: str  # diffusion model folder
    guidance: str  # guidance folder (tailforge train guidance): classifier, discriminator, class Gaussians
    num: PositiveInt  # number of samples
    sampling: SamplingConfig = SamplingConfig()  # sampler (ddpm or ddim) and steps; paper: 250 DDPM steps
    guide: GuidanceConfig = GuidanceConfig()  # alpha, beta, tau, loss variant

    def __post_init__(self):
        super().__post_init__()
        guided_sampler_spec(self.sampling.sampler)

    def pins(self) -> dict[str, str]:
        """The model's hash and the guidance folder's (its guidance.json ``guidance_hash``, the
        hash of its classifier, discriminator and class Gaussians, which every sample records)."""
        from tailforge.gen.models.guidance import load_guidance

        return {**super().pins(), "guidance": load_guidance(self.guidance).info.get("guidance_hash")}


@dataclasses.dataclass(frozen=True)
class ReconstructConfig(ShardJobConfig):
    """`tailforge gen reconstruct`, one shard set per t_re; copied into every sample's json."""

    kind: ClassVar[str] = "reconstruct"
    job: str = dataclasses.field(default=kind, kw_only=True)

    model: str  # diffusion model folder
    dataset: str  # dataset spec whose images are reconstructed (labels are kept)
    t_re: float  # reverse step as a fraction of T: 0 = the real images, 1 = full generation
    split: str = "train"  # which split of the dataset is reconstructed
    sampling: SamplingConfig = SamplingConfig()  # sampler; `steps` is the full chain's count (t_re = 1)
