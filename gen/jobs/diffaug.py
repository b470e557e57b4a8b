"""The DiffAug stage a trainer calls: in-process, or served by a pool of Ray actors (gen.jobs.ray)."""

from __future__ import annotations

from typing import Iterable, Iterator

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.stage import Batch, Stage
from tailforge.gen.methods.diffaug import DiffAugConfig, augment_batch, load_denoiser


class DiffAugStage:
    """The in-process DiffAug stage (one model in this process): a Stage for a single-GPU or CPU trainer."""

    def __init__(self, config: DiffAugConfig, device: str | None = None):
        self.config = config
        self.denoiser, self.model = load_denoiser(config, default_device(device))

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            augmented = augment_batch(self.denoiser, self.model, self.config, batch["images"], batch["labels"],
                                      int(batch["index"]), int(batch["seed"]))
            yield {**batch, "augmented": augmented}


def make_diffaug_stage(model_dir: str, actors: int = 0, seed: int | None = None, *, clip_denoised: bool = True,
                       threads: int = 1, device: str | None = None, max_in_flight: int | None = None,
                       address: str | None = None, actor_cpus: float | None = None) -> Stage:
    """The DiffAug stage for a trainer: in-process with ``actors=0``, else served by a pool of
    ``actors`` AugmentActors (one model each) with at most ``max_in_flight`` batches in flight
    (default 2 per actor). Both give the same augmented batches for the same seed.

    ``seed`` None uses each batch's "seed"; ``threads`` is the denoiser's torch CPU thread count in
    every process that runs it (:class:`DiffAugConfig`). ``device`` is the in-process stage's torch device;
    ``address`` / ``actor_cpus`` configure the pool (see :class:`tailforge.gen.jobs.ray.ServedDiffAugStage`).
    """
    if actors < 0:
        raise ConfigError(f"actors must be >= 0, got {actors}")
    config = DiffAugConfig(model=str(model_dir), seed=seed, clip_denoised=clip_denoised, threads=threads)
    if actors == 0:
        return DiffAugStage(config, device)
    from tailforge.gen.jobs.ray import ServedDiffAugStage

    return ServedDiffAugStage(config, actors=actors, max_in_flight=max_in_flight, address=address,
                              actor_cpus=actor_cpus)
