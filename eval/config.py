"""The evaluation commands' configs (`tailforge eval corruptions | density | emm | fidelity |
memorization | ood`) and the names they are checked against, importable without torch; each
evaluation is the module of its name beside this one."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable

from tailforge.gen.core.checks import Check, NonNegativeInt, OneOf, PositiveFloat, PositiveInt, check_fields
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.refs import resolve
from tailforge.gen.diffusion.config import SAMPLERS
from tailforge.gen.methods.config import SHRINKAGE
from tailforge.gen.models.config import UNET_PRESETS

REFERENCE_SIZE = 32  # CIFAR-10-C's image size: pixel parameters are stated for it
SEVERITIES = (1, 2, 3, 4, 5)
Severity = Annotated[int, Check(lambda v: v in SEVERITIES, "a severity in 1..5")]
#: the module whose functions the corruption entries name
_CORRUPTIONS = "tailforge.eval.corruptions"


@dataclasses.dataclass(frozen=True)
class Corruption:
    """A CIFAR-10-C corruption (Hendrycks & Dietterich 2019) of eval/corruptions.py; its functions are named
    as "module:function" text, imported on use, so the names and families need no torch."""

    name: str
    family: str  # noise | blur | weather | digital (the benchmark's grouping)
    fn: str  # "module:function" (images in [0, 1], CorruptionContext) -> corrupted images; "": cannot be computed here
    benchmark: bool  # one of the 15 CIFAR-10-C corruptions (False: the 4 extra validation ones)
    needs_colour: bool = False
    unavailable: str = ""  # why fn is ""
    missing: str = ""  # "module:function" () -> why fn cannot run in this environment now ("" when it can)

    def function(self) -> Callable[..., Any]:
        return resolve(self.fn)

    def missing_here(self) -> str:
        return resolve(self.missing)() if self.missing else ""


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in [
    Corruption("gaussian_noise", "noise", f"{_CORRUPTIONS}:gaussian_noise", True),
    Corruption("shot_noise", "noise", f"{_CORRUPTIONS}:shot_noise", True),
    Corruption("impulse_noise", "noise", f"{_CORRUPTIONS}:impulse_noise", True),
    Corruption("defocus_blur", "blur", f"{_CORRUPTIONS}:defocus_blur", True),
    Corruption("glass_blur", "blur", f"{_CORRUPTIONS}:glass_blur", True),
    Corruption("motion_blur", "blur", f"{_CORRUPTIONS}:motion_blur", True),
    Corruption("zoom_blur", "blur", f"{_CORRUPTIONS}:zoom_blur", True),
    Corruption("snow", "weather", f"{_CORRUPTIONS}:snow", True),
    Corruption("frost", "weather", f"{_CORRUPTIONS}:frost", True, missing=f"{_CORRUPTIONS}:frost_missing"),
    Corruption("fog", "weather", f"{_CORRUPTIONS}:fog", True),
    Corruption("brightness", "weather", f"{_CORRUPTIONS}:brightness", True),
    Corruption("contrast", "digital", f"{_CORRUPTIONS}:contrast", True),
    Corruption("elastic_transform", "digital", f"{_CORRUPTIONS}:elastic_transform", True),
    Corruption("pixelate", "digital", f"{_CORRUPTIONS}:pixelate", True),
    Corruption("jpeg_compression", "digital", f"{_CORRUPTIONS}:jpeg_compression", True),
    Corruption("speckle_noise", "noise", f"{_CORRUPTIONS}:speckle_noise", False),
    Corruption("gaussian_blur", "blur", f"{_CORRUPTIONS}:gaussian_blur", False),
    Corruption("spatter", "weather", "", False, unavailable="needs OpenCV's Canny edges and distance transform"),
    Corruption("saturate", "digital", f"{_CORRUPTIONS}:saturate", False, needs_colour=True),
]}


#: EMM's training budget: the same epochs for every training-set size, or the same optimizer steps
BUDGETS = ("epochs", "steps")
#: EMM's conditioning: true labels | none (unconditional) | random | unique (Gu et al. 2023 Sec. 6)
LABEL_MODES = ("true", "none", "random", "unique")
#: the runs of an EMM study per seed (EMMStudyConfig.run_config)
EMM_STUDY_RUNS = ("sizes", "dummy", "random", "unique", "imbalance")


@dataclasses.dataclass(frozen=True)
class CorruptionSuiteConfig:
    """`tailforge eval corruptions`; copied into corruptions.json."""

    classifier: str  # classifier folder (tailforge train classifier)
    dataset: str  # dataset spec whose `split` is corrupted
    split: str = "test"  # split to corrupt
    corruptions: tuple[str, ...] = ()  # corruption names; empty (`all` as a flag): every one that applies here
    severities: tuple[Severity, ...] = SEVERITIES  # CIFAR-10-C severities
    # image size CIFAR-10-C's pixel parameters are stated for; the images' own size applies them unscaled
    reference_size: PositiveInt = REFERENCE_SIZE
    limit: NonNegativeInt = 0  # use only the first N images (0: all)
    seed: NonNegativeInt = 0  # corruption noise seed
    diffaug_ensemble: str | None = None  # diffusion model folder: evaluate DiffAug-Ensemble of the classifier

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class DensityConfig:
    """`tailforge eval density`; copied into its report."""

    k: PositiveInt = 5  # AvgkNN neighbours (Sehwag et al. 2022: five)
    lof_neighbors: PositiveInt = 20  # LOF neighbourhood (scikit-learn's default; the paper does not say)
    pr_k: PositiveInt = 3  # k of the precision/recall manifolds (Kynkaanniemi et al. 2019)
    # class covariances of the evaluation features (96-d, ~140 per class on digits)
    shrinkage: Annotated[str, OneOf(SHRINKAGE)] = "ledoit_wolf"
    folds: PositiveInt = 5  # cross-fitting folds for the real training data's own hardness

    def __post_init__(self):
        check_fields(self)


def parse_class_counts(entries: tuple[str, ...]) -> dict[int, int]:
    """EMMConfig.class_counts ("CLASS:IMAGES" entries) as {class: images}; one line naming a bad entry."""
    counts: dict[int, int] = {}
    for entry in entries:
        head, sep, tail = str(entry).partition(":")
        try:
            cls, images = int(head), int(tail)
        except ValueError:
            cls = images = -1
        if not sep or cls < 0 or images < 2 or cls in counts:
            raise ConfigError(f"class_counts entry {entry!r}: expected CLASS:IMAGES with a class index >= 0 listed "
                              "once and at least 2 images (the ratio criterion needs two nearest training images)")
        counts[cls] = images
    return counts


@dataclasses.dataclass(frozen=True)
class EMMConfig:
    """`tailforge eval emm`; copied into emm.json and every run's result."""

    dataset: str = "digits"  # dataset spec; size N trains on SPEC?n=N (nested subsets of its training split)
    sizes: tuple[int, ...] = (50, 100, 200, 400, 0)  # training-set sizes; 0 = the full training split
    # true | none (unconditional) | random | unique (Gu et al. 2023 Sec. 6)
    labels: Annotated[str, OneOf(LABEL_MODES)] = "true"
    random_classes: NonNegativeInt = 0  # C for random labels; 0 = the dataset's number of classes
    dummy: NonNegativeInt = 0  # Gaussian-mixture dummy images added as one extra class (Yoon et al. 2023 Hypothesis 2)
    # CLASS:IMAGES entries: train on that many images of each listed class only, e.g. 0:100,1:5 for a majority
    # and a minority class (Yoon et al. 2023 Hypothesis 3); the sizes must then be `full`
    class_counts: tuple[str, ...] = ()
    # epochs: every size trains for the same number of epochs, so each image is drawn equally often
    # (Gu et al. 2023 App. B); steps: every size trains for the same number of optimizer steps
    budget: Annotated[str, OneOf(BUDGETS)] = "epochs"
    epochs: PositiveInt = 500  # passes over the training set (dummy images included) with budget=epochs (paper: 40k)
    steps: PositiveInt = 2000  # optimizer steps with budget=steps
    snapshots: PositiveInt = 4  # memorization measured at this many evenly spaced points of training
    batch_size: PositiveInt = 128  # training batch
    lr: PositiveFloat = 2e-3  # AdamW learning rate
    preset: Annotated[str, OneOf(UNET_PRESETS)] | None = None  # U-Net preset (None: tiny up to 16 px, small above)
    num_samples: PositiveInt = 1000  # generated images per model (Gu et al. 2023 uses 10k)
    sampler: Annotated[str, OneOf(SAMPLERS)] = "ddim"  # sampler for the generated images
    sampling_steps: PositiveInt = 50  # its steps
    epsilon: PositiveFloat = 0.1  # EMM threshold: ratio >= 1 - epsilon (Gu et al. 2023 sets 0.1)
    subset_seed: NonNegativeInt = 0  # permutation that makes the nested subsets
    seed: NonNegativeInt = 0  # model initialisation, training batches, sampling noise and random labels

    def __post_init__(self):
        check_fields(self)
        if not self.sizes:
            raise ConfigError("give at least one training-set size")
        if any(n < 0 for n in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"sizes must be distinct and >= 2 (0 = full), got {self.sizes}")
        if any(0 < n < 2 for n in self.sizes):
            raise ConfigError(f"the ratio criterion needs at least 2 training images; got sizes {self.sizes}")
        if self.dummy and self.labels != "true":
            raise ConfigError("dummy-data injection conditions on the dummy class: use it with labels=true")
        if self.class_counts:
            parse_class_counts(self.class_counts)
            if self.sizes != (0,) or self.dummy or self.labels != "true":
                raise ConfigError("class_counts chooses the training set itself: use it with sizes=full, labels=true "
                                  "and no dummy images")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1), got {self.epsilon}")


@dataclasses.dataclass(frozen=True)
class EMMStudyConfig:
    """`tailforge eval emm-study`; copied into emm-study.json. Every run is an EMMConfig with these settings
    (one training procedure: the same epochs, batch, model and sampler for every run)."""

    dataset: str = "digits"  # dataset spec whose training split the subsets are drawn from
    seeds: PositiveInt = 3  # seeds 0..N-1; seed K sets the models, batches, sampling and the subsets' permutation
    sizes: tuple[int, ...] = (10, 25, 50, 100)  # nested training-set sizes of the Hypothesis 1 sweep (0 = full)
    # subset size of the dummy-injection and random / unique label runs; one of the sizes (its sweep run is their control)
    variant_size: PositiveInt = 25
    # Gaussian-mixture dummy images added to that subset as one extra class (Yoon et al. 2023 App. B.2 adds 3 per real image)
    dummy: PositiveInt = 75
    # the imbalanced training set of Yoon et al. 2023 Hypothesis 3, CLASS:IMAGES: a majority and a minority class
    class_counts: tuple[str, ...] = ("0:100", "1:5")
    epochs: PositiveInt = 2000  # passes over each run's training set (Gu et al. 2023 App. B: the same for every size)
    snapshots: PositiveInt = 2  # memorization measured at this many evenly spaced points of training (the highest counts)
    batch_size: PositiveInt = 64  # training batch
    lr: PositiveFloat = 2e-3  # AdamW learning rate
    preset: Annotated[str, OneOf(UNET_PRESETS)] | None = None  # U-Net preset (None: tiny up to 16 px, small above)
    num_samples: PositiveInt = 500  # generated images per run and snapshot
    sampler: Annotated[str, OneOf(SAMPLERS)] = "ddim"  # sampler for the generated images
    sampling_steps: PositiveInt = 50  # its steps
    epsilon: PositiveFloat = 0.1  # EMM threshold: ratio >= 1 - epsilon (Gu et al. 2023 sets 0.1)

    def __post_init__(self):
        check_fields(self)
        if self.seeds < 2:
            raise ConfigError(f"seeds must be at least 2, got {self.seeds}: a t-interval across seeds needs a spread")
        if self.variant_size not in self.sizes:
            raise ConfigError(f"variant_size {self.variant_size} must be one of the sizes {self.sizes}: the sweep's run "
                              "at that size is the control of the dummy and label runs")
        if len(parse_class_counts(self.class_counts)) != 2 or len(set(parse_class_counts(self.class_counts).values())) != 2:
            raise ConfigError(f"class_counts {','.join(self.class_counts)}: give two classes with different image "
                              "counts (a majority and a minority)")
        self.run_config("sizes", 0)  # every run's own checks

    def run_config(self, variant: str, seed: int) -> "EMMConfig":
        """The EMMConfig of one run: "sizes" (true labels, every size), "dummy", "random" and "unique" (at
        variant_size) or "imbalance" (class_counts), for seed `seed`."""
        common = dict(dataset=self.dataset, budget="epochs", epochs=self.epochs, snapshots=self.snapshots,
                      batch_size=self.batch_size, lr=self.lr, preset=self.preset, num_samples=self.num_samples,
                      sampler=self.sampler, sampling_steps=self.sampling_steps, epsilon=self.epsilon,
                      subset_seed=seed, seed=seed)
        if variant not in EMM_STUDY_RUNS:
            raise ConfigError(f"unknown EMM study run {variant!r}; choose one of {EMM_STUDY_RUNS}")
        variants = {"sizes": dict(sizes=self.sizes), "dummy": dict(sizes=(self.variant_size,), dummy=self.dummy),
                    "random": dict(sizes=(self.variant_size,), labels="random"),
                    "unique": dict(sizes=(self.variant_size,), labels="unique"),
                    "imbalance": dict(sizes=(0,), class_counts=self.class_counts)}
        return EMMConfig(**common, **variants[variant])


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    """`tailforge eval fidelity`; copied into fidelity.json."""

    shards: str  # synthetic shard set
    dataset: str  # real dataset spec: its training split is the reference, its test split the FD floor
    classifier: str  # evaluation classifier folder: the feature space of the Frechet distance
    folds: PositiveInt = 5  # cross-validation folds of the fake detector
    seed: NonNegativeInt = 0  # class balancing and fold seed

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class MemorizationConfig:
    """`tailforge eval memorization`; copied into memorization.json."""

    dataset: str  # spec of the data the model was trained on: its training split is the reference
    shards: str | None = None  # generated shard set to check
    model: str | None = None  # diffusion model folder: generate `num` samples first (into OUT/samples)
    classifier: str | None = None  # classifier folder for the feature-space check (Sehwag et al. 2022 Sec. 5)
    pairs: PositiveInt = 24  # closest pairs listed and drawn
    num: PositiveInt = 1000  # with model: samples to generate (Gu et al. 2023 uses 10k)
    sampler: Annotated[str, OneOf(SAMPLERS)] = "ddim"  # with model: sampler
    steps: PositiveInt = 50  # with model: sampling steps
    seed: NonNegativeInt = 0  # with model: job seed

    def __post_init__(self):
        check_fields(self)
        if bool(self.shards) == bool(self.model):
            raise ConfigError("give exactly one of --shards DIR (generated samples) or --model DIR (generate first)")


#: the far OOD sets eval ood builds at any dataset's size and channels (eval/ood.py default_ood_sets)
FAR_OOD_SETS = ("mondrian", "gm", "ri", "noise", "digits")


@dataclasses.dataclass(frozen=True)
class OODConfig:
    """`tailforge eval ood`; copied into ood.json."""

    dataset: str  # ID dataset spec: its training split fits the feature statistics, its test split is ID
    classifier: str | None = None  # classifier folder (None: train one, see holdout_classes)
    diffaug_ensemble: str | None = None  # diffusion model folder: evaluate DiffAug-Ensemble of the classifier
    ood: tuple[str, ...] = ()  # extra OOD dataset specs (their test split if they have one)
    default_sets: bool = True  # add the rotated-ID near set and the far sets of `far`
    # far OOD sets added with default_sets: Yoon et al. 2023's Mondrian, Gaussian-mixture and Random Ink images,
    # i.i.d. Gaussian noise, and digits test images resized to the ID size (skipped when the ID data is digits)
    far: tuple[Annotated[str, OneOf(FAR_OOD_SETS)], ...] = FAR_OOD_SETS
    num: PositiveInt = 500  # images per OOD set
    holdout_classes: tuple[int, ...] = ()  # open-set protocol: train without these, their test images are near-OOD
    model: str = "tinycnn"  # with holdout_classes: timm model to train
    epochs: PositiveInt = 30  # with holdout_classes: training epochs
    seed: int = 0  # with holdout_classes: training seed
    knn_k: PositiveInt = 50  # K of the kNN score (OpenOOD's CIFAR setting)
    react_percentile: float = 90.0  # ReAct clip percentile of ID features
    ash_percentile: float = 90.0  # ASH-B pruning percentile
    scale_percentile: float = 85.0  # SCALE percentile

    def __post_init__(self):
        check_fields(self)


def tre_shard_pair(text: str) -> tuple[float | None, str] | None:
    """``T=DIR`` as (T, DIR) with T a number in [0, 1]; a bare ``DIR`` as (None, DIR): its t_re is the
    one its _info.json records. None when malformed."""
    value, sep, folder = text.partition("=")
    if not sep:
        return (None, text) if text else None
    try:
        t_re = float(value)
    except ValueError:
        return None
    return (t_re, folder) if folder and 0 <= t_re <= 1 else None


#: one --shards item of `tailforge eval reconstruction`
TreShards = Annotated[str, Check(lambda v: tre_shard_pair(v) is not None,
                                 "T=SHARD_DIR with T a number in [0, 1], or SHARD_DIR")]
Fraction = Annotated[float, Check(lambda v: 0 < v < 1, "a fraction in (0, 1)")]


@dataclasses.dataclass(frozen=True)
class ReconstructionStudyConfig:
    """`tailforge eval reconstruction` (Yamaguchi & Fukuda 2023 Sec. 4.1 and 4.2); copied into reconstruction.json."""

    real: str  # real dataset spec; its `split` is the reference every set is measured against
    classifier: str  # evaluation classifier folder (trained on real data): the features of FD, precision/recall, PCA
    # T=DIR or DIR: a shard set reconstructed at t_re = T (tailforge gen reconstruct; a bare DIR: the t_re its
    # _info.json records); repeatable
    shards: tuple[TreShards, ...]
    split: str = "test"  # reference split of the real dataset; not the split the sets were reconstructed from
    pr_k: PositiveInt = 3  # k of the precision/recall manifolds (Kynkaanniemi et al. 2019)
    folds: PositiveInt = 5  # cross-validation folds of the logistic-regression fake detector
    holdout: Fraction = 0.3  # fraction of each kind the CNN fake detector never trains on and is scored on
    epochs: PositiveInt = 30  # CNN fake detector training epochs
    resamples: PositiveInt = 500  # bootstrap resamples of the Frechet distance interval
    seed: NonNegativeInt = 0  # seed of the class balancing, the detectors' splits and weights, the bootstrap

    def __post_init__(self):
        check_fields(self)
        if not self.shards:
            raise ConfigError("shards: give at least one T=DIR reconstructed shard set")
        t_res = [t for t, _ in map(tre_shard_pair, self.shards) if t is not None]
        if len(set(t_res)) != len(t_res):
            raise ConfigError(f"shards: each t_re once, got {sorted(t_res)}")
