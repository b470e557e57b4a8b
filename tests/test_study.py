"""`tailforge study`: findings combined across seeds (exact t-intervals, every verdict), the presets
each seed runs with, and a toy-size Fashion-MNIST study (its CPU preset on a small folder in the
idx layout) end to end that resumes without recomputing anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_idx import write_idx_folder

from tailforge.config import DemoConfig, StudyConfig
from tailforge.eval.findings import combine_seeds
from tailforge.eval.stats import Interval, seeds_interval, verdict
from tailforge.gen.core.errors import ConfigError

#: Student's t quantile t_{0.975, 2} (any t table: 4.303), the 95 % interval of a mean of 3 values
T_975_2 = 4.302652729911275


def row(finding: str, estimate: float, direction: str = "greater", min_effect: float = 0.0,
        items: int = 360, half: float = 0.05) -> dict:
    """One seed's row as eval.findings.decide writes it (its own bootstrap interval: estimate +- half)."""
    return {"paper": "Sehwag et al. 2022", "finding": finding, "difference": "d", "direction": direction,
            "min_effect": min_effect, "estimate": estimate, "low": estimate - half, "high": estimate + half,
            "level": 0.95, "method": "paired bootstrap (2000 resamples)", "items": items, "seeds": 1,
            "verdict": "inconclusive"}


def test_three_seeds_give_the_t_interval_of_a_normal_mean_with_the_items_noise_and_every_verdict():
    # per claim, three seeds' differences d: mean 0.11 (or 0.02, -0.11) with sample std 0.01; each seed's
    # own interval over the test items is d +- 0.003
    per_claim = {"gain": [0.10, 0.11, 0.12], "too little": [0.01, 0.02, 0.03], "loss": [-0.10, -0.11, -0.12],
                 "no gain of a point": [-0.010, -0.005, 0.000]}
    directions = {"no gain of a point": ("not_greater", 0.01)}
    runs = [[row(name, values[seed], *directions.get(name, ("greater", 0.0)), items=360 - seed, half=0.003)
             for name, values in per_claim.items()] for seed in range(3)]
    combined = {r["finding"]: r for r in combine_seeds(runs)}
    half = math.hypot(T_975_2 * 0.01 / math.sqrt(3), 0.003)  # t_{0.975, n-1} s / sqrt(n), and the items' half-width
    for name, mean in (("gain", 0.11), ("too little", 0.02), ("loss", -0.11)):
        assert combined[name]["estimate"] == pytest.approx(mean)
        assert combined[name]["low"] == pytest.approx(mean - half) and combined[name]["high"] == pytest.approx(mean + half)
    half = math.hypot(T_975_2 * 0.005 / math.sqrt(3), 0.003)
    assert combined["no gain of a point"]["high"] == pytest.approx(-0.005 + half)
    assert {name: r["verdict"] for name, r in combined.items()} == {
        "gain": "reproduced", "too little": "inconclusive", "loss": "contradicted", "no gain of a point": "reproduced"}
    for r in combined.values():
        # n = seeds, the fewest test items of any seed, and each seed's own row kept in run order
        assert r["seeds"] == 3 and r["items"] == 358 and r["method"].startswith("t over seeds")
        assert [s["estimate"] for s in r["per_seed"]] == per_claim[r["finding"]]


def test_seeds_that_agree_exactly_keep_the_test_items_uncertainty():
    # three seeds measure the same 0.02 (e.g. one test image each time): the seeds' spread is 0, but the
    # test set's noise is not, so a gain inside each seed's own interval stays inconclusive
    combined = combine_seeds([[row("same", 0.02, half=0.03)] for _ in range(3)])[0]
    assert (combined["low"], combined["high"]) == pytest.approx((0.02 - 0.03, 0.02 + 0.03))
    assert combined["verdict"] == "inconclusive"


def test_combining_runs_that_checked_different_claims_is_refused():
    with pytest.raises(ConfigError, match="'loss'.*missing from run"):
        combine_seeds([[row("gain", 0.1), row("loss", -0.1)], [row("gain", 0.1)]])


def test_each_seed_runs_its_datasets_preset_in_its_own_folder(tmp_path):
    cpu = StudyConfig(out=str(tmp_path), dataset="fashion-mnist", seeds=3).demo_config(2, gpu=False)
    assert cpu.out == str(tmp_path / "seed-2") and cpu.seed == 2
    assert cpu.dataset == "fashion-mnist?size=16&n=10000" and cpu.corruption_reference_size == 32
    # the CPU preset: the evaluation classifier on the whole training split, every seed on seed 0's diffusion model
    assert cpu.reference_dataset == "fashion-mnist?size=16" and cpu.corruption_items == 2000
    assert cpu.diffusion_model == str(tmp_path / "seed-0" / "models" / "diffusion")
    assert StudyConfig(out=str(tmp_path), dataset="fashion-mnist").demo_config(0, gpu=False).diffusion_model is None
    gpu = StudyConfig(dataset="fashion-mnist:/data/fm").demo_config(0, gpu=True)
    assert gpu.dataset == "fashion-mnist:/data/fm?size=28" and gpu.unet_preset == "small"
    assert gpu.diffusion_model is None and gpu.reference_dataset is None  # each seed trains its own model
    assert StudyConfig(dataset="fashion-mnist", size=28).demo_config(0, gpu=False).dataset == "fashion-mnist?size=28"
    # digits: the demo's own defaults, only out and seed differ
    digits = StudyConfig(dataset="digits").demo_config(1, gpu=True)
    assert digits == DemoConfig(out=digits.out, seed=1) and digits.out == str(Path("study-out") / "seed-1")
    # a settings file goes over the preset, nested tables included
    settings = tmp_path / "toy.toml"
    settings.write_text('num_samples = 7\n[sampling]\nsteps = 3\n')
    toy = StudyConfig(dataset="fashion-mnist", demo_settings=str(settings)).demo_config(0, gpu=False)
    assert toy.num_samples == 7 and toy.sampling.steps == 3 and toy.dataset.endswith("n=10000")
    settings.write_text('dataset = "digits"\n')
    with pytest.raises(ConfigError, match="toy.toml: dataset 'digits' differs from the study's"):
        StudyConfig(dataset="fashion-mnist", demo_settings=str(settings)).demo_config(0, gpu=False)


def test_the_memorization_study_runs_at_the_studys_dataset_size_and_seeds(tmp_path):
    fashion = StudyConfig(dataset="fashion-mnist", seeds=4).memorization_config(gpu=False)
    # EMM draws its own nested subsets, so the training split's size option of the demo is not passed on
    assert fashion.dataset == "fashion-mnist?size=16" and fashion.seeds == 4 and fashion.epochs == 1000
    assert fashion.sizes == (10, 25, 50) and fashion.variant_size == 10
    assert StudyConfig(dataset="digits").memorization_config(gpu=True).dataset == "digits"
    settings = tmp_path / "emm.json"
    settings.write_text(json.dumps({"epochs": 3, "sizes": [5, 10], "variant_size": 5}))
    toy = StudyConfig(dataset="digits", memorization_settings=str(settings)).memorization_config(gpu=False)
    assert (toy.epochs, toy.sizes, toy.seeds) == (3, (5, 10), 3)
    settings.write_text(json.dumps({"seeds": 5}))
    with pytest.raises(ConfigError, match="emm.json: seeds 5 differs from the study's 3"):
        StudyConfig(dataset="digits", memorization_settings=str(settings)).memorization_config(gpu=False)


@pytest.mark.parametrize("fields, message", [
    ({"seeds": 1}, "at least 2"), ({"dataset": "cifar10:/data"}, "digits or fashion-mnist"),
    ({"dataset": "fashion-mnist?size=8"}, "sets the dataset's options"), ({"dataset": "digits", "size": 16}, "no preset"),
    ({"size": 12}, "size: expected an image size with a preset")])
def test_bad_study_settings_are_one_line_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig(**fields)


def quality(agreement: float, distance: float, floor: float, accuracy: float) -> dict:
    """One seed's sample-quality figures as study.sample_quality writes them (only what combining reads)."""
    def point(value: float) -> dict:
        return {"estimate": value}
    return {"items": 500, "floor": {"frechet_distance": point(floor)}, "real_test_items": 10000,
            "classifier_accuracy": point(accuracy),
            "sets": {"set": {"class_agreement": point(agreement), "frechet_distance": point(distance),
                             "fd_over_floor": distance / floor}}}


@pytest.mark.parametrize("agreements, distances, accuracies, targets", [
    ([0.90, 0.92, 0.94], [1.2, 1.3, 1.4], [0.925, 0.93, 0.935], ("met", "met", "met")),  # well inside the targets
    ([0.50, 0.52, 0.54], [5.0, 5.2, 5.4], [0.85, 0.86, 0.87], ("missed", "missed", "missed")),
    # the seeds straddle every target
    ([0.70, 0.80, 0.90], [2.0, 3.0, 4.0], [0.88, 0.90, 0.92], ("inconclusive", "inconclusive", "inconclusive"))])
def test_sample_quality_is_combined_by_t_intervals_and_judged_against_its_targets(agreements, distances, accuracies,
                                                                                   targets):
    from tailforge.study import combine_quality

    combined = combine_quality([quality(a, d, 1.0, c) for a, d, c in zip(agreements, distances, accuracies)])
    row = combined["sets"]["set"]
    assert row["class_agreement"]["estimate"] == pytest.approx(sum(agreements) / 3)
    assert row["fd_over_floor"]["high"] - row["fd_over_floor"]["estimate"] == pytest.approx(
        T_975_2 * (distances[2] - distances[1]) / math.sqrt(3))  # equally spaced: sample std = the spacing
    accuracy = combined["classifier_accuracy"]
    assert (row["agreement_target"], row["fd_target"], accuracy["target"]) == targets
    assert combined["floor"]["seeds"] == 3 and accuracy["items"] == 10000
    assert accuracy["estimate"] == pytest.approx(sum(accuracies) / 3)


TOY = {"diffusion_steps": 8, "num_samples": 20, "sampling": {"steps": 3}, "guidance_epochs": 1, "classifier_epochs": 1,
       "reference_epochs": 1, "corruptions": ["gaussian_noise"], "severities": [5], "actors": 0}


TOY_MEMORIZATION = {"sizes": [6, 12], "variant_size": 6, "dummy": 6, "class_counts": ["0:8", "1:3"], "epochs": 4,
                    "batch_size": 16, "num_samples": 20, "sampling_steps": 2}
#: what each sitting rewrites from its parts' cached results
SUMMARIES = ("summary.json", "study.json", "emm.json", "emm-study.json")


def write_toy_fashion_mnist(root: Path) -> None:
    """A Fashion-MNIST folder in its idx layout (gzipped) with 200 training and 100 test images: scikit-learn's
    digits, 8x8 upscaled 3x and padded to 28x28, at 0-255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.pad(np.kron(digits.images, np.ones((3, 3))) * 255 / 16, ((0, 0), (2, 2), (2, 2))).round()
    write_idx_folder(root, {"train": images[:200], "test": images[200:300]},
                     {"train": digits.target[:200], "test": digits.target[200:300]}, gz=True)


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory):
    from tailforge.cli import main

    out = tmp_path_factory.mktemp("study")
    settings, memorization = out.parent / "toy-settings.json", out.parent / "toy-memorization.json"
    settings.write_text(json.dumps(TOY))
    memorization.write_text(json.dumps(TOY_MEMORIZATION))
    fashion = out.parent / "fashion-mnist"
    write_toy_fashion_mnist(fashion)
    # the CPU preset (16 px, seed 0's diffusion model for every seed, the evaluation classifier on the whole
    # training split) with the toy's steps and a 150-image training draw
    command = ["study", "--dataset", f"fashion-mnist:{fashion}", "--size", "16", "--train-images", "150", "--seeds",
               "2", "--out", str(out), "--demo-settings", str(settings), "--memorization-settings", str(memorization),
               "--judge-resamples", "50"]
    assert main(command) == 0
    first = json.loads((out / "study.json").read_text())
    # everything a stage made (not the reports and summaries, which each sitting rewrites)
    made = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
            if p.is_file() and "report" not in p.parts and p.name not in SUMMARIES}
    assert main(command) == 0
    return out, first, json.loads((out / "study.json").read_text()), made


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the fixture's two studies (four toy demo runs) count towards the first test
def test_study_combines_both_seeds_for_every_finding_and_judges_every_shard_set(study_runs):
    out, first, _, _ = study_runs
    assert len(first["findings"]) >= 8
    # the memorization study's findings follow the demo's, over the same seeds
    assert [r["paper"] for r in first["findings"][-5:]] == ["Gu et al. 2023; Yoon et al. 2023", "Yoon et al. 2023",
                                                             "Gu et al. 2023", "Gu et al. 2023", "Yoon et al. 2023"]
    assert first["memorization"]["config"]["seeds"] == 2 and first["memorization_seconds"] > 0
    for r in first["findings"]:
        # (the minority-class finding compares each class's half of the 20 samples)
        assert r["seeds"] == 2 and len(r["per_seed"]) == 2 and r["items"] >= 10
        # the combined interval is seeds_interval of the seeds' own intervals, decided by the one rule
        expected = seeds_interval([Interval(**{k: s[k] for k in ("estimate", "low", "high", "level", "method",
                                                                 "items", "seeds")}) for s in r["per_seed"]])
        assert (r["estimate"], r["low"], r["high"]) == pytest.approx((expected.estimate, expected.low, expected.high))
        assert r["verdict"] == verdict(Interval(**{k: r[k] for k in ("estimate", "low", "high", "level", "method",
                                                                     "items", "seeds")}), r["direction"], r["min_effect"])
    quality = first["sample_quality"]
    assert set(quality["combined"]["sets"]) == {"baseline", "lowdensity", "reconstructed", "lowdensity-noisy",
                                                "lowdensity-da"}
    for seed in quality["per_seed"]:
        floor = seed["floor"]["frechet_distance"]
        assert seed["items"] == 20 and floor["low"] <= floor["estimate"] <= floor["high"]
        for judged in seed["sets"].values():
            agreement = judged["class_agreement"]
            assert 0 <= agreement["low"] <= agreement["estimate"] <= agreement["high"] <= 1 and agreement["items"] == 20
            assert judged["fd_over_floor"] == pytest.approx(judged["frechet_distance"]["estimate"] / floor["estimate"])
    for judged in quality["combined"]["sets"].values():
        assert {judged["agreement_target"], judged["fd_target"]} <= {"met", "missed", "inconclusive"}
    assert [set(s) >= {"models", "shards", "classifiers", "evaluation", "report", "sample quality"}
            for s in first["seconds"]] == [True, True]
    assert first["peak_memory_gib"]["self"] > 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["present"][:4] == ["findings", "sample-quality", "times", "seed-reports"]
    assert report["sections"]["findings"]["data"]["findings"] == first["findings"]
    assert all((out / f"seed-{k}" / "report" / "report.html").is_file() for k in (0, 1))
    # seed 1 sampled, guided and augmented with seed 0's diffusion model and trained none of its own
    assert first["demo_config"]["diffusion_model"] is None and not (out / "seed-1" / "models" / "diffusion").exists()
    seed_1 = json.loads((out / "seed-1" / "shards" / "baseline" / "_info.json").read_text())
    assert seed_1["job"]["model"] == str(out / "seed-0" / "models" / "diffusion")
    accuracy = quality["combined"]["classifier_accuracy"]
    assert accuracy["items"] == 100 and accuracy["target"] in {"met", "missed", "inconclusive"}
    reference = json.loads((out / "seed-0" / "models" / "reference-classifier" / "classifier.json").read_text())
    assert reference["train_config"]["dataset"] == f"fashion-mnist:{out.parent / 'fashion-mnist'}?size=16"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_second_run_reuses_every_stage_of_every_seed(study_runs):
    _, first, second, made = study_runs
    changed = [str(p) for p, (mtime, data) in made.items()
               if not p.exists() or p.stat().st_mtime_ns != mtime or p.read_bytes() != data]
    assert changed == []
    assert second["findings"] == first["findings"] and second["sample_quality"] == first["sample_quality"]
    # each seed's stage times are those of the sitting that finished it, not of the reuse
    assert second["seconds"] == first["seconds"]
