"""Contracts every entry of a registry keeps, checked entry by entry (as timm tests its model
registry): a new entry is tested by being registered."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
from torch import nn

from tailforge.eval.emm import estimate_emm
from tailforge.eval.ood import OOD_SCORES, auroc, fit_scorer
from tailforge.eval.report import (
    READ_THROUGH,
    REPORT_SECTIONS,
    ReportInputs,
    build_section,
    discover,
    write_report,
)
from tailforge.eval.results import RESULT_VERSIONS, tag_result

# --------------------------------------------------------------------------------------------
# OOD scores (eval.ood.OOD_SCORES)

DIM, CLASSES = 40, 4  # each class owns a block of DIM / CLASSES pixels


class PrototypeNet(nn.Module):
    """A timm-style classifier whose embedding is the image shifted to [0, 2] (non-negative, like
    post-ReLU features) and whose linear head scores each class by the sum of its block."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(DIM, CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(CLASSES).repeat_interleave(DIM // CLASSES, 1))
            self.head.bias.zero_()

    def forward_features(self, x):
        return x.flatten(1) + 1

    def forward_head(self, features, pre_logits: bool = False):
        return features if pre_logits else self.head(features)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _images(labels: torch.Tensor | None, count: int, seed: int) -> torch.Tensor:
    """uint8 [count, 1, 1, DIM]: dark noise, and the block of its class bright (labels None: all dark)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 26, (count, DIM), generator=gen)
    if labels is not None:
        bright = torch.randint(230, 256, (count, DIM), generator=gen)
        block = torch.arange(DIM) // (DIM // CLASSES)
        images = torch.where(block[None] == labels[:, None], bright, images)
    return images.to(torch.uint8).reshape(count, 1, 1, DIM)


@pytest.fixture(scope="module")
def id_and_ood():
    """A scorer fitted on in-distribution images of the prototype classes, held-out ID images,
    and OOD images with no class's block lit."""
    labels = torch.arange(200) % CLASSES
    fit = types.SimpleNamespace(images=_images(labels, 200, 0), labels=labels,
                                info=types.SimpleNamespace(num_classes=CLASSES))
    scorer = fit_scorer(PrototypeNet(), fit, knn_k=5)
    return scorer, _images(torch.arange(60) % CLASSES, 60, 1), _images(None, 60, 2)


def test_every_ood_score_says_where_it_comes_from():
    for name, spec in OOD_SCORES.items():
        assert spec.name == name and spec.input in ("logits", "features")
        assert re.search(r"[A-Z]\w+.* (19|20)\d\d$", spec.paper), (name, spec.paper)


def test_the_prototype_scorer_computes_every_ood_score(id_and_ood):
    scorer, _, _ = id_and_ood
    assert scorer.names == tuple(OOD_SCORES) and scorer.not_applicable() == {}


@pytest.mark.parametrize("name", list(OOD_SCORES))
def test_ood_score_gives_one_finite_score_per_input(id_and_ood, name):
    scorer, id_images, ood_images = id_and_ood
    for images in (id_images, ood_images):
        score = scorer.scores(images)[name]
        assert score.shape == (len(images),) and torch.isfinite(score).all()


@pytest.mark.parametrize("name", list(OOD_SCORES))
def test_ood_score_is_higher_in_distribution(id_and_ood, name):
    scorer, id_images, ood_images = id_and_ood
    assert auroc(scorer.scores(id_images)[name], scorer.scores(ood_images)[name]) > 0.99


@pytest.mark.parametrize("name", list(OOD_SCORES))
def test_ood_score_does_not_depend_on_batch_order(id_and_ood, name):
    scorer, id_images, ood_images = id_and_ood
    images = torch.cat([id_images, ood_images])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(scorer.scores(images[order])[name], scorer.scores(images)[name][order],
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Report sections (eval.report.REPORT_SECTIONS) and result kinds (eval.results.RESULT_VERSIONS)

#: the smallest result of each kind its section renders (the fields its builder reads)
MINIMAL_RESULTS = {
    "density": {"shards": "S", "classifier": "C",
                "samples": {"hardness": {"median": 2.0}, "avg_knn": {"median": 1.0}, "lof": {"median": 1.1},
                            "precision": 0.8, "recall": 0.7, "accuracy": 0.9},
                "real_test": {"hardness": {"median": 1.5}, "avg_knn": {"median": 0.9}, "lof": {"median": 1.0},
                              "precision": 0.9, "recall": 0.9, "accuracy": 0.95}},
    "accuracy": {"classifier": "C", "dataset": "digits", "n": 10, "top1": 0.9, "ece": 0.05},
    "corruptions": {"clean_accuracy": 0.9, "mean_corruption_accuracy": 0.6, "families": {"noise": 0.6},
                    "per_severity": {"1": 0.7, "5": 0.5}, "included_in_mean": ["gaussian_noise"],
                    "corruptions": {"gaussian_noise": {"family": "noise", "mean_accuracy": 0.6, "severities": [
                        {"severity": 1, "accuracy": 0.7, "unchanged_fraction": 0.0},
                        {"severity": 5, "accuracy": 0.5, "unchanged_fraction": 0.0}]}}},
    "ood": {"scores_computed": ["msp"], "mean_over_sets": {"msp": {"auroc": 0.9, "fpr95": 0.3}},
            "sets": {"ri": {"kind": "far", "num": 2, "scores": {
                "msp": {"auroc": 0.9, "fpr95": 0.3, "fpr95_ood_positive": 0.4, "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.9, 1.0]}}}}}},
    "fidelity": {"frechet_distance": 3.0, "fake_detection": {"pixel": {"accuracy": 0.6}, "dct": {"accuracy": 0.7}}},
    "memorization": {"num_generated": 4, "num_train": 10, "memorization_ratio": 0.25,
                     "distinct_train_images_replicated": 1, "median_ratio_d1_d2": 0.6,
                     "ratio_histogram": {"edges": [0.0, 0.5, 1.0], "counts": [1, 3]}},
    "emm": {"config": {"labels": "true", "steps": 10, "epsilon": 0.1}, "emm": estimate_emm([10, 20], [1.0, 0.5]),
            "points": [{"size": n, "memorization_ratio": r, "distinct_train_images_replicated": n // 2,
                        "median_ratio_d1_d2": 0.2, "run": f"n{n}"} for n, r in ((10, 1.0), (20, 0.5))]},
    "emm_study": {"config": {"dataset": "digits", "seeds": 2, "epochs": 10, "epsilon": 0.1},
                  "findings": [{"paper": "P", "finding": "F", "difference": "D", "estimate": 0.1, "low": 0.0,
                                "high": 0.2, "items": 10, "seeds": 2, "verdict": "inconclusive"}],
                  "ratios": {"n10": {"num_train": 10, "epochs": 10.0, "per_seed": [0.5, 0.7],
                                     "interval": {"estimate": 0.6, "low": 0.4, "high": 0.8}}},
                  "emm": {"per_seed": [None, 12.0], "interval": None, "note": "not bracketed"}},
    "reconstruction": {"config": {"classifier": "C"},
                       "reference": {"dataset": "digits", "split": "test", "num_images": 10},
                       "points": [{"t_re": t, "label": f"t_re {t}", "num_samples": 10, "precision_recall_items": 10,
                                   **{m: {"estimate": 0.5, "low": 0.4, "high": 0.6}
                                      for m in ("frechet_distance", "precision", "recall")},
                                   "fake_detection": {d: {"logistic_regression": {"interval": {
                                       "estimate": 0.5, "low": 0.4, "high": 0.6}}, "cnn": {"interval": {
                                           "estimate": 0.5, "low": 0.4, "high": 0.6}, "test_items": 6}}
                                       for d in ("pixel", "dct")}} for t in (0.0, 0.5)]},
    "entropy": {"classifier": "C", "split": "train",
                "datasets": {"digits": {"n": 10, "mean_entropy": 0.4, "max_entropy": 2.3, "top1": 0.9}}},
}

NO_INPUTS = ReportInputs(samples={}, classifier=None, dataset=None, tre={})


def test_every_result_kind_has_a_section_or_is_read_through_another():
    assert set(RESULT_VERSIONS) == set(REPORT_SECTIONS) | set(READ_THROUGH)
    assert set(READ_THROUGH.values()) <= set(REPORT_SECTIONS) and not set(READ_THROUGH) & set(REPORT_SECTIONS)
    assert set(MINIMAL_RESULTS) == set(REPORT_SECTIONS)  # a new section needs its minimal result here
    for kind, spec in REPORT_SECTIONS.items():
        assert spec.kind == kind and spec.version == RESULT_VERSIONS[kind]


@pytest.mark.parametrize("kind", list(REPORT_SECTIONS))
def test_report_section_renders_a_minimal_result_of_its_kind(tmp_path, kind):
    spec = REPORT_SECTIONS[kind]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(tag_result(kind, MINIMAL_RESULTS[kind])))
    found, unrecognised = discover([str(tmp_path)])
    assert unrecognised == [] and [p for p, _ in found[kind]] == [path]
    section, unreadable = build_section(spec, found[kind], NO_INPUTS)
    assert unreadable == [] and section.absent is None
    assert section.key == kind and section.title == spec.title and (section.tables or section.figures)
    assert str(path) in json.dumps(section.to_json())  # the section says which file it shows


@pytest.mark.parametrize("kind", list(REPORT_SECTIONS))
def test_report_section_without_results_is_absent_with_its_reason(kind):
    section, _ = build_section(REPORT_SECTIONS[kind], [], NO_INPUTS)
    assert section.absent == REPORT_SECTIONS[kind].absent and section.title


def test_an_unknown_kind_is_not_recognised(tmp_path):
    files = {
        "unknown.json": {"kind": "nonsense", "version": 1},
        "no_kind.json": {"top1": 0.5, "per_class": []},  # an accuracy result from before results had a kind
        "old_version.json": {**tag_result("ood", MINIMAL_RESULTS["ood"]), "version": 0},
        "malformed.json": tag_result("ood", {"scores_computed": ["msp"]}),
        "list.json": [1, 2],
    }
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "good.json").write_text(json.dumps(tag_result("fidelity", MINIMAL_RESULTS["fidelity"])))
    report = write_report(tmp_path / "report", results=[str(tmp_path)], samples={})
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["inputs"]["not_recognised"]["first"]}
    assert set(reasons) == {*files, "broken.json"}
    assert "unknown result kind 'nonsense'" in reasons["unknown.json"]
    assert reasons["no_kind.json"] == reasons["list.json"] == "no known result kind"
    assert "version 0" in reasons["old_version.json"] and "malformed ood" in reasons["malformed.json"]
    assert report["present"] == ["fidelity"] and "ood" in report["absent"]
    assert "malformed.json" in (tmp_path / "report" / "report.html").read_text()


# --------------------------------------------------------------------------------------------
# Samplers (gen.diffusion.config.SAMPLERS) and datasets (gen.data.datasets.DATASETS)

import numpy as np  # noqa: E402  (this section's own imports, kept with it)
from PIL import Image  # noqa: E402
from test_guidance import GaussianEps as ImageGaussianEps  # noqa: E402
from test_guidance import make_models as guidance_models  # noqa: E402

from tailforge.gen.core.errors import ConfigError, DatasetError  # noqa: E402
from tailforge.gen.core.noise import PerSampleNoise  # noqa: E402
from tailforge.gen.data.datasets import DATASETS, load_dataset  # noqa: E402
from tailforge.gen.diffusion.config import SAMPLERS, SamplingConfig
from tailforge.gen.diffusion.denoiser import ClampDenoised, DenoiserWrapper, EpsDenoiser  # noqa: E402
from tailforge.gen.diffusion.samplers import get_sampler, sampler_sigmas  # noqa: E402
from tailforge.gen.diffusion.schedules import alphas_cumprod  # noqa: E402
from tailforge.gen.methods.config import GuidanceConfig
from tailforge.gen.methods.lowdensity import LowDensityGuidance, step_rule  # noqa: E402


class _CountingDenoiser(DenoiserWrapper):
    """Counts denoiser calls (each call evaluates every row of the batch once)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return self.inner(x, sigma, labels)


def _gaussian_denoiser():
    """The exact denoiser of pixels x0 ~ N(MU, STD^2) under the linear DDPM schedule, clamped as in generation."""
    ac = alphas_cumprod("linear")
    return ClampDenoised(EpsDenoiser(ImageGaussianEps(ac), ac))


GUIDED_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.step_rule]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 5])
def test_every_sampler_gives_finite_samples_with_the_evaluations_its_spec_declares(name, steps):
    spec = SAMPLERS[name]
    assert spec.name == name and spec.evals_per_step >= 1
    sampling = SamplingConfig(sampler=name, steps=steps, eta=1.0)
    assert set(sampling.sampler_settings()) == set(spec.settings)
    denoiser = _CountingDenoiser(_gaussian_denoiser())
    sigmas = sampler_sigmas(name, denoiser, steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    indices = [3, 4, 5, 6]
    x = sigmas[0] * PerSampleNoise(0, indices).randn((1, 8, 8))
    out = get_sampler(name, **sampling.sampler_settings())(denoiser, x, sigmas, rng=PerSampleNoise(1, indices))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert denoiser.calls == spec.evals(steps) == sampling.evals_per_sample()


def test_guided_samplers_are_those_with_a_step_rule():
    assert GUIDED_SAMPLERS, "low-density guidance needs at least one sampler with a step rule"
    for name in set(SAMPLERS) - set(GUIDED_SAMPLERS):
        with pytest.raises(ConfigError, match=" or ".join(GUIDED_SAMPLERS)):
            step_rule(name, {})


@pytest.mark.parametrize("name", GUIDED_SAMPLERS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_guided_step_rule_reproduces_its_unguided_step_at_alpha_beta_zero(name, eta):
    settings = SamplingConfig(sampler=name, eta=eta).sampler_settings()
    rule = step_rule(name, settings)
    denoiser = _gaussian_denoiser()
    sigmas = sampler_sigmas(name, denoiser, 6)
    indices = [0, 1, 2, 3]
    labels = torch.tensor(indices) % 10
    x = sigmas[0] * PerSampleNoise(7, indices).randn((1, 8, 8))
    sample = get_sampler(name, **settings)
    steps = []
    plain = sample(denoiser, x, sigmas, labels=labels, rng=PerSampleNoise(8, indices), callback=steps.append)
    # The rule's pure step is the sampler's own: step 0 from x with the sampler's first noise draw.
    s, s_next = sigmas[0], sigmas[1]
    noise = PerSampleNoise(8, indices).randn_like(x)
    assert torch.equal(rule.step(x, denoiser(x, s.expand(4), labels), s, s_next, noise), steps[0]["x"])
    # It is affine in the denoised estimate (what the guidance wrapper relies on), and Sigma_theta > 0.
    d1, d2 = torch.randn_like(x), torch.randn_like(x)
    weight = rule.step(torch.zeros(()), torch.ones(()), s, s_next, torch.zeros(()))
    torch.testing.assert_close(rule.step(x, d1, s, s_next, noise) - rule.step(x, d2, s, s_next, noise),
                                weight * (d1 - d2), rtol=1e-5, atol=1e-6 * float(x.abs().max()))  # x ~ sigma_max
    assert float(rule.sigma_theta(s, s_next)) > 0
    # Wrapped in guidance with alpha = beta = 0, the whole chain is the unguided one bit for bit.
    off = LowDensityGuidance(denoiser, guidance_models("x0"), GuidanceConfig(alpha=0.0, beta=0.0), sigmas, rule)
    assert torch.equal(sample(off, x, sigmas, labels=labels, rng=PerSampleNoise(8, indices)), plain)


def _tiny_options(options):
    """Tiny values for the options a registry entry declares (only those it declares)."""
    tiny = {"train": "6", "test": "3", "size": "8", "channels": "1", "seed": "0"}
    return "&".join(f"{k}={tiny[k]}" for k in options if k in tiny)


def _write_image_folder(root):
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i + (label == "b") * 100, dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _idx_folder(root):
    from test_idx import write_idx_folder

    rng = np.random.default_rng(0)
    write_idx_folder(root, {"train": rng.integers(0, 256, (6, 4, 4)), "test": rng.integers(0, 256, (3, 4, 4))},
                     {"train": np.arange(6) % 3, "test": np.arange(3)}, gz=True)
    return str(root)


def _shard_set(root):
    from tailforge.train.streams import write_real_shards

    return str(write_real_shards("digits?n=12", root))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_entry_loads_or_names_its_missing_path(name, tmp_path):
    loader = DATASETS[name]
    if loader.needs_path:
        missing = tmp_path / "no-such-folder"
        with pytest.raises(DatasetError) as err:
            load_dataset(f"{name}:{missing}")
        assert str(missing) in str(err.value) and "\n" not in str(err.value)
        tiny = {"imagefolder": lambda: str(_write_image_folder(tmp_path / "folder")),
                "shards": lambda: _shard_set(tmp_path / "shards"),
                "fashion-mnist": lambda: _idx_folder(tmp_path / "idx"), "mnist": lambda: _idx_folder(tmp_path / "idx")}
        if name not in tiny:  # a dataset on disk the tests do not have (cifar10)
            return
        spec = f"{name}:{tiny[name]()}"
    else:
        options = _tiny_options(loader.options)
        spec = name + (f"?{options}" if options else "")
    data = load_dataset(spec, "train")
    assert len(data) > 0 and data.images.dtype == torch.uint8 and data.images.shape[1] in (1, 3)
    assert data.labels.shape == (len(data),) and int(data.labels.max()) < data.info.num_classes
    if name == "shards":  # shard sets say what they read, through the same registry call
        assert data.read_report["skipped"] == [] and data.read_report["shards_read"] > 0
    # Options outside the entry's declaration are refused in one line naming the allowed ones.
    with pytest.raises(DatasetError, match="allowed") as err:
        load_dataset(f"{spec}{'&' if '?' in spec else '?'}no_such_option=1")
    assert "\n" not in str(err.value)

