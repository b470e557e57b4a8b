"""The configs of `tailforge demo` (the embedded default, run by demo.py) and of `tailforge study` (the
demo over several seeds, study.py), importable without torch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from tailforge.gen.core.checks import Check, NonNegativeInt, PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.methods.config import GuidanceConfig

if TYPE_CHECKING:
    from tailforge.eval.config import EMMStudyConfig

#: a noise, two blurs and contrast (with CIFAR-10-C's pixel parameters unscaled at 8 px, see
#: DemoConfig.corruption_reference_size), at three severities, so that DiffAug-Ensemble (nine extra
#: U-Net passes per image) fits the CPU budget
DEMO_CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "motion_blur", "contrast")
DEMO_SEVERITIES = (1, 3, 5)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`tailforge demo`; copied into summary.json and the report."""

    out: str = "demo-out"  # output folder (models, shards, classifiers, evaluations, report)
    dataset: str = "digits"  # any dataset spec; digits is bundled with scikit-learn
    diffusion_steps: PositiveInt = 800  # the diffusion model's training steps
    # a diffusion model folder (trained with label dropout) that every stage uses instead of training one into
    # OUT/models/diffusion; diffusion_steps, label_dropout, unet_preset and diffusion_batch_size then do nothing
    diffusion_model: str | None = None
    # labels replaced by the null class in training (Ho & Salimans 2022's p_uncond): the one model also
    # denoises without labels for DiffAug, instead of a second, unconditional model (about 2 min on the CPU)
    label_dropout: float = 0.2
    unet_preset: str | None = None  # U-Net preset; None: tiny for <= 16 px, small above (ddpm-cifar10 for the paper)
    diffusion_batch_size: PositiveInt = 128  # diffusion training batch
    num_samples: PositiveInt = 500  # baseline and low-density samples each (sample i uses the same seed in both)
    # every generation job's sampler: ancestral DDPM (Sehwag et al. 2022's baseline sampler) on a 50-step grid. Not DDIM at
    # eta = 0: without fresh noise each step, guidance at alpha = beta = 0.5 drives the samples off the data
    # (README, "Low-density generation": class agreement 0.26 with alpha alone at DDIM 50, 0.99 at DDPM 50)
    sampling: SamplingConfig = SamplingConfig(sampler="ddpm", steps=50)
    guide: GuidanceConfig = GuidanceConfig()  # Sehwag et al. 2022's alpha = beta = 0.5
    guidance_epochs: PositiveInt = 10  # guidance nets' training epochs
    t_re: float = 0.5  # reconstruction's reverse step as a fraction of T (Yamaguchi & Fukuda 2023)
    classifier: str = "tinycnn"  # the architecture every compared classifier uses
    classifier_epochs: PositiveInt = 15  # their epochs (the same steps for each: one pass over the real data per epoch)
    synthetic_weight: float = 0.5  # sampling weight of a synthetic set next to real = 1
    reference_classifier: str = "tinycnn_wide"  # independent evaluation classifier (never guides)
    reference_epochs: PositiveInt = 20  # its epochs
    # the dataset spec the evaluation classifier trains on (unset: `dataset`): a judge trained on more of the
    # same data (the Fashion-MNIST study: the full training split, while the compared classifiers see 10,000)
    reference_dataset: str | None = None
    corruptions: tuple[str, ...] = DEMO_CORRUPTIONS  # corruption suite (empty, `all` as a flag: every one that applies)
    severities: tuple[int, ...] = DEMO_SEVERITIES  # CIFAR-10-C severities evaluated
    # image size CIFAR-10-C's pixel parameters are stated for; 8 applies them unscaled to digits (scaled to
    # 8 px, blurs stay below a pixel and change nothing: README, "Corruptions at small sizes")
    corruption_reference_size: PositiveInt = 8
    # corrupted test images per (corruption, severity): the first N of the test split (0: all); DiffAug-Ensemble
    # costs nine U-Net passes per image, so the CPU preset of Fashion-MNIST corrupts part of its 10,000
    corruption_items: NonNegativeInt = 0
    diffaug_actors: int = 0  # DiffAug served by this many AugmentActors (0: in the training process)
    # Ray actors of the generation jobs (None: one per GPU, or 2 on a CPU); 0: no Ray
    actors: NonNegativeInt | None = None
    seed: int = 0  # every job's and trainer's seed

    def __post_init__(self):
        check_fields(self)
        if not 0 < self.label_dropout < 1:
            raise ConfigError(f"label_dropout must be in (0, 1), got {self.label_dropout}: DiffAug-Ensemble needs "
                              "the null class to denoise test images without their labels")


#: the memorization study (eval emm-study) of a Fashion-MNIST study: EMMStudyConfig settings over its defaults.
#: A 16 px training pass costs about 4x an 8 px one, so the sets are smaller than digits' (each image drawn
#: 1,000 times; about a quarter of the digits study's passes in 8 px terms)
FASHION_MEMORIZATION: dict[str, Any] = {"sizes": (10, 25, 50), "variant_size": 10, "dummy": 30, "epochs": 1000,
                                        "class_counts": ("0:50", "1:5"), "num_samples": 300, "snapshots": 1}
#: keys of a study preset that are not DemoConfig fields: the training split's size, the sampler's steps, the
#: EMMStudyConfig settings of the memorization study (its dataset and seeds are the study's), whether the
#: evaluation classifier trains on the full training split, and whether every seed uses seed 0's diffusion model
STUDY_ONLY_KEYS = ("train_images", "sampling_steps", "memorization", "reference_full_split", "shared_diffusion")

#: `tailforge study`'s datasets: the name a --dataset starts with -> its presets of demo settings by image
#: size (None: the dataset's own size). Each preset is laid over DemoConfig's defaults; docs/evaluation.md,
#: "Studies", gives the time each takes and how that was estimated.
STUDY_PRESETS: dict[str, dict[int | None, dict[str, Any]]] = {
    # the demo's defaults: bundled, minutes per seed on a CPU; the memorization study at EMMStudyConfig's defaults
    "digits": {None: {"memorization": {}}},
    "fashion-mnist": {
        # the CPU preset (docs/evaluation.md "Studies" has its measured times): a 16x16 antialiased copy (28x28
        # does not fit), one diffusion model (seed 0's: its 2,000 steps are a third of a seed) that every seed
        # samples, guides, reconstructs and augments with; 10,000 of the 60,000 training images for the compared
        # classifiers and the guidance nets (the reconstructed set is that whole split), the evaluation classifier
        # on all 60,000 (90 % needs them at 16 px); the full 10,000-image test split, 20 DDPM steps, and three
        # CIFAR-10-C benchmark corruptions (noise, blur, digital) at the middle severity, scaled from 32 px, on the
        # first 2,000 test images: DiffAug-Ensemble's nine U-Net passes per image cost 2 minutes per 10,000
        16: {"diffusion_steps": 2000, "unet_preset": "tiny", "num_samples": 1000, "sampling_steps": 20,
             "guidance_epochs": 5, "classifier_epochs": 10, "reference_epochs": 10, "train_images": 10000,
             "reference_full_split": True, "shared_diffusion": True,
             "corruptions": ("gaussian_noise", "motion_blur", "contrast"), "severities": (3,),
             "corruption_items": 2000, "corruption_reference_size": 32, "memorization": FASHION_MEMORIZATION},
        # the GPU preset (not yet timed): full size, every training image, the small U-Net, every corruption
        # that applies at CIFAR-10-C's 5 severities
        28: {"diffusion_steps": 20000, "unet_preset": "small", "num_samples": 10000, "sampling_steps": 100,
             "guidance_epochs": 10, "classifier_epochs": 30, "reference_epochs": 30, "train_images": None,
             "corruptions": (), "severities": (1, 2, 3, 4, 5), "corruption_reference_size": 32,
             "memorization": FASHION_MEMORIZATION},
    },
}


def _study_size(size: int) -> bool:
    return any(size in presets for presets in STUDY_PRESETS.values())


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """`tailforge study`; copied into study.json and the study's report."""

    out: str = "study-out"  # output folder: one demo run per seed (seed-0, seed-1, ...), study.json, report
    dataset: str = "fashion-mnist"  # digits or fashion-mnist[:PATH]; picks the preset of demo settings
    seeds: PositiveInt = 3  # training seeds 0..N-1 (at least 2: the t-interval across seeds needs a spread)
    # image size of a dataset with several presets (fashion-mnist: 16 or 28); unset: 28 with a GPU, 16 on a CPU
    size: Annotated[int, Check(_study_size, "an image size with a preset (16 or 28)")] | None = None
    # training images of the compared classifiers, the guidance nets and the reconstructed set, drawn from the
    # training split (unset: the preset's; fashion-mnist's CPU preset: 10,000); smaller for a trial run
    train_images: PositiveInt | None = None
    # YAML, TOML or JSON file of demo settings laid over the preset (`tailforge demo --config`'s format)
    demo_settings: str | None = None
    # samples per shard set that the sample-quality judge compares (a larger set is subsampled; unset: num_samples)
    judge_items: PositiveInt | None = None
    judge_resamples: PositiveInt = 200  # bootstrap resamples of each of the judge's Frechet distances
    # YAML, TOML or JSON file of memorization-study settings (`tailforge eval emm-study --config`'s format) laid over
    # the preset's; its dataset and seeds stay the study's
    memorization_settings: str | None = None

    def __post_init__(self):
        check_fields(self)
        if self.seeds < 2:
            raise ConfigError(f"seeds must be at least 2, got {self.seeds}: a t-interval across seeds needs a spread")
        name = self.dataset.partition(":")[0].strip().lower()
        if name not in STUDY_PRESETS or "?" in self.dataset:
            raise ConfigError(f"dataset {self.dataset!r}: a study runs on {' or '.join(STUDY_PRESETS)} (with :PATH), "
                              "and sets the dataset's options itself")
        if self.size is not None and self.size not in STUDY_PRESETS[name]:
            raise ConfigError(f"size {self.size}: {name} has no preset of that size (it has "
                              f"{', '.join(str(s) for s in STUDY_PRESETS[name] if s) or 'only its own size'})")

    def preset(self, gpu: bool) -> tuple[int | None, dict[str, Any]]:
        """The image size and the preset of demo settings this study runs (with or without a GPU)."""
        presets = STUDY_PRESETS[self.dataset.partition(":")[0].strip().lower()]
        wanted = self.size if self.size is not None else 28 if gpu else 16
        size = wanted if wanted in presets else next(iter(presets))  # digits: its one preset
        return size, presets[size]

    def demo_config(self, seed: int, gpu: bool) -> DemoConfig:
        """Seed `seed`'s demo settings: DemoConfig's defaults, the preset, then the --demo-settings file
        (which may not change the dataset; its out and seed are replaced); its output folder OUT/seed-SEED."""

        size, preset = self.preset(gpu)
        full = self.dataset + (f"?size={size}" if size else "")  # the whole training split
        train_images = self.train_images or preset.get("train_images")
        spec = full + (("&" if size else "?") + f"n={train_images}" if train_images else "")
        settings = {k: v for k, v in preset.items() if k not in STUDY_ONLY_KEYS}
        if preset.get("reference_full_split"):
            settings["reference_dataset"] = full
        if preset.get("shared_diffusion") and seed > 0:
            settings["diffusion_model"] = str(Path(self.out) / "seed-0" / "models" / "diffusion")
        sampling = (dataclasses.replace(DemoConfig.sampling, steps=preset["sampling_steps"])
                    if "sampling_steps" in preset else DemoConfig.sampling)
        base = DemoConfig(**settings, sampling=sampling, dataset=spec)
        if self.demo_settings:
            base = _settings_file_over(base, self.demo_settings, fixed=("dataset",))
        return dataclasses.replace(base, out=str(Path(self.out) / f"seed-{seed}"), seed=seed)

    def memorization_config(self, gpu: bool) -> "EMMStudyConfig":
        """The memorization study's settings: EMMStudyConfig's defaults, the preset's, then the
        --memorization-settings file; the dataset at the preset's image size (EMM draws its own subsets, so
        without the preset's training-split size) and the study's seeds."""
        from tailforge.eval.config import EMMStudyConfig

        size, preset = self.preset(gpu)
        spec = self.dataset + (f"?size={size}" if size else "")
        base = EMMStudyConfig(**{**preset["memorization"], "dataset": spec, "seeds": self.seeds})
        if self.memorization_settings:
            base = _settings_file_over(base, self.memorization_settings, fixed=("dataset", "seeds"))
        return base


def _settings_file_over(base: Any, path: str, *, fixed: tuple[str, ...]) -> Any:
    """The settings of the YAML, TOML or JSON file `path` laid over the config `base` (of the same class);
    a setting in `fixed` that differs from base's (the study's --dataset, --seeds) is one line naming it."""
    from tailforge.gen.core.config_files import build_config, config_table, config_values, read_config_file

    data, saved = config_table(type(base), read_config_file(path))
    values = config_values(type(base), data, path, saved=saved)
    for key in fixed:
        if values.get(key, getattr(base, key)) != getattr(base, key):
            raise ConfigError(f"{path}: {key} {values[key]!r} differs from the study's {getattr(base, key)!r}; the "
                              f"study's --{key} (and its preset) set it")
    return build_config(type(base), values, path, defaults=base)
