"""`tailforge study` (`make study`): the demo's pipeline over several seeds, every finding decided across them.

For seed K = 0 .. seeds-1 the demo (demo.py :func:`run_demo`) runs into OUT/seed-K with the dataset's
preset of settings (config.py STUDY_PRESETS) and ``seed = K``; every stage of it is cached there, so a
study that was stopped resumes where it stopped. Then, for every claim of eval/findings.py, each
seed's measured difference becomes one value of a Student-t interval across the seeds (n = seeds),
widened by the shared test items' noise (eval/stats.py :func:`seeds_interval`), decided by the one rule (eval/stats.py :func:`verdict`), each seed's own bootstrap interval kept
beside it. Alongside:

* a sample-quality judge per shard set (baseline, low-density, reconstructed), measured by the
  seed's evaluation classifier, which never guides: the fraction of samples it assigns to their
  requested class (exact interval) and the Frechet distance of their embeddings to the real test
  split's, next to the floor two real samples reach at the same sizes (``judge_items`` real training
  images against the same test split), each with its bootstrap interval, and all three combined
  across seeds;
* the seconds of every stage of every seed (from each seed's summary.json) and the peak memory.

OUT/study.json holds all of it; OUT/report/report.html leads with the combined findings and links
each seed's own report.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tailforge.config import DemoConfig, StudyConfig
from tailforge.demo import GUIDANCE_COMPARISON, run_demo
from tailforge.eval.emm_study import run_emm_study
from tailforge.eval.fidelity import frechet_distance_interval
from tailforge.eval.findings import combine_seeds
from tailforge.eval.report import VERDICT_DECISION, Section, Table, findings_section, settings_section, write_report
from tailforge.eval.stats import Interval, proportion_interval, t_interval, verdict
from tailforge.gen.core.device import default_device
from tailforge.gen.core.files import config_dict, saved_result, write_json_atomic
from tailforge.gen.data.datasets import LabeledImages, load_dataset
from tailforge.gen.models.classifiers import embed, load_classifier, predict_logits

#: the shard sets of every seed the judge measures (folders under the seed's shards/), the sets guided by
#: noisy and by DA classifiers among them
JUDGED_SETS = ("baseline", "lowdensity", "reconstructed", *(f"lowdensity-{name}" for name in GUIDANCE_COMPARISON))
#: what class-conditional samples should reach: this fraction assigned to their class, and a Frechet
#: distance at most this multiple of the real-vs-real floor
AGREEMENT_TARGET = 0.8
FD_RATIO_TARGET = 3.0
#: the test accuracy the evaluation classifier, trained on real images alone, should reach: the lower end of
#: small CNNs on Fashion-MNIST (Xiao et al. 2017's benchmark, 90-93 %)
REAL_ACCURACY_TARGET = 0.9
#: a target's verdict (eval/stats.py verdict of the t-interval against it) in the judge's words
TARGET_WORDS = {"reproduced": "met", "contradicted": "missed", "inconclusive": "inconclusive"}
#: the demo's stages in its summary.json "seconds", in order
STAGES = ("models", "shards", "classifiers", "evaluation", "report")
#: how a study's findings intervals are made (the report's note under the findings table)
STUDY_RULE = ("Each interval is a 95 % Student-t interval of the mean over the seeds of the difference each seed "
              "measured, widened in quadrature by the seeds' mean bootstrap half-width over the test items (the "
              "per-seed intervals are in the per-seed table); " + VERDICT_DECISION)


# --------------------------------------------------------------------------------------------
# The sample-quality judge


def _take(count: int, items: int, rng: np.random.Generator) -> np.ndarray:
    """min(count, items) indices of `count`, chosen by `rng`, in increasing order."""
    return np.sort(rng.permutation(count)[:items])


def sample_quality(classifier: torch.nn.Module, sets: dict[str, LabeledImages], real_pool: LabeledImages,
                   real_test: LabeledImages, *, items: int, seed: int, resamples: int) -> dict[str, Any]:
    """The test accuracy of `classifier` on `real_test` (exact interval); per shard set (at most `items`
    samples, chosen with `seed`): the fraction `classifier` assigns to
    the label each sample was requested with (exact interval), and the Frechet distance of their
    embeddings to `real_test`'s (bias-shifted bootstrap interval); and the real-vs-real floor: the same
    distance for `items` images of `real_pool` (real images outside `real_test`), at the same sizes. Each
    distance's interval rests on `resamples` bootstrap refits of both Gaussians."""
    rng = np.random.default_rng(seed)
    test_features = embed(classifier, real_test.images)
    correct = predict_logits(classifier, real_test.images).argmax(1) == real_test.labels
    pool = real_pool.images[torch.from_numpy(_take(len(real_pool), items, rng))]
    floor = frechet_distance_interval(embed(classifier, pool), test_features, resamples=resamples, seed=seed)
    judged = {}
    for name, data in sets.items():
        chosen = data.subset(_take(len(data), items, rng))
        assigned = predict_logits(classifier, chosen.images).argmax(1) == chosen.labels
        distance = frechet_distance_interval(embed(classifier, chosen.images), test_features, resamples=resamples,
                                             seed=seed)
        judged[name] = {"class_agreement": proportion_interval(assigned.numpy()).as_dict(),
                        "frechet_distance": distance.as_dict(), "fd_over_floor": distance.estimate / floor.estimate}
    return {"items": int(min(items, len(pool))), "real_test_items": len(real_test),
            "classifier_accuracy": proportion_interval(correct.numpy()).as_dict(),
            "floor": {"frechet_distance": floor.as_dict(), "real_items": len(pool)}, "sets": judged}


def _judge(demo: DemoConfig, items: int, resamples: int) -> dict[str, Any]:
    """A seed's sample-quality result, reused from OUT/seed-K/sample-quality.json when it was made
    with the same inputs (the seed's demo settings among them: other settings retrain the models and
    regenerate the sets in the same folders)."""
    out = Path(demo.out)
    key = {"classifier": str(out / "models" / "reference-classifier"), "items": items, "resamples": resamples,
           "sets": {name: str(out / "shards" / name) for name in JUDGED_SETS}, "demo": config_dict(demo)}
    target = out / "sample-quality.json"
    saved = saved_result(target, key)
    if saved is not None:
        return saved
    started = time.perf_counter()
    classifier, _ = load_classifier(key["classifier"], default_device())
    sets = {name: load_dataset(f"shards:{folder}", "train") for name, folder in key["sets"].items()}
    result = {**sample_quality(classifier, sets, load_dataset(demo.dataset, "train"),
                               load_dataset(demo.dataset, "test"), items=items, seed=demo.seed, resamples=resamples),
              "config": key}
    result["seconds"] = round(time.perf_counter() - started, 1)  # of the sitting that measured it, kept on reuse
    write_json_atomic(target, result)
    return result


def _across(values: list[float], items: int) -> dict[str, Any]:
    return t_interval(values, items=items).as_dict()


def combine_quality(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The judge's figures across seeds: per shard set the t-intervals of class agreement, Frechet
    distance and its ratio to the floor, with the verdict of each against its target (the one rule,
    eval/stats.py verdict, in TARGET_WORDS); the floor's t-interval."""
    items = min(q["items"] for q in per_seed)
    accuracy = [q["classifier_accuracy"]["estimate"] for q in per_seed]
    combined: dict[str, Any] = {
        "floor": _across([q["floor"]["frechet_distance"]["estimate"] for q in per_seed], items),
        "classifier_accuracy": {**_across(accuracy, per_seed[0]["real_test_items"]), "target": TARGET_WORDS[
            verdict(t_interval([a - REAL_ACCURACY_TARGET for a in accuracy]), "greater")]},
        "sets": {}}
    for name in per_seed[0]["sets"]:
        rows = [q["sets"][name] for q in per_seed]
        agreement = [r["class_agreement"]["estimate"] for r in rows]
        ratio = [r["fd_over_floor"] for r in rows]
        combined["sets"][name] = {
            "class_agreement": _across(agreement, items),
            "frechet_distance": _across([r["frechet_distance"]["estimate"] for r in rows], items),
            "fd_over_floor": _across(ratio, items),
            "agreement_target": TARGET_WORDS[verdict(t_interval([a - AGREEMENT_TARGET for a in agreement]), "greater")],
            "fd_target": TARGET_WORDS[verdict(t_interval([r - FD_RATIO_TARGET for r in ratio]), "less")]}
    return combined


# --------------------------------------------------------------------------------------------
# Report sections


def _interval(row: dict[str, Any], digits: int = 3) -> str:
    return f"{row['estimate']:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}]"


def study_findings(combined: list[dict[str, Any]], dataset: str) -> Section:
    """The lead: every finding across the seeds, and each seed's own interval folded below."""
    seeds = combined[0]["seeds"] if combined else 0
    section = findings_section(combined, f"{dataset}, {seeds} training seeds", rule=STUDY_RULE)
    section.tables.append(Table(
        "each seed's own interval", ["finding", "seed", "d, 95 % interval", "items", "verdict of that seed alone"],
        [[row["finding"], seed, f"{r['estimate']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]", r["items"], r["verdict"]]
         for row in combined for seed, r in enumerate(row["per_seed"])],
        note="within one seed: the paired bootstrap over the items (or the exact binomial interval) of the demo",
        folded=True))
    return section


def quality_section(combined: dict[str, Any], per_seed: list[dict[str, Any]]) -> Section:
    section = Section("sample-quality", "Sample quality by the evaluation classifier, per shard set")
    floor = combined["floor"]
    section.tables.append(Table(
        "class agreement and Frechet distance to the real test split, mean over seeds [95 % t-interval]",
        ["shard set", "class agreement", f">= {AGREEMENT_TARGET:.0%}", "FD to real test", "FD / real-vs-real floor",
         f"<= {FD_RATIO_TARGET:g}x floor", "items x seeds"],
        [[name, _interval(row["class_agreement"]), row["agreement_target"], _interval(row["frechet_distance"]),
          _interval(row["fd_over_floor"], 2), row["fd_target"], f"{row['class_agreement']['items']} x {floor['seeds']}"]
         for name, row in combined["sets"].items()],
        note=(f"class agreement: fraction of the samples the evaluation classifier (never a guide) assigns to the class "
              f"each was generated for (reconstructions: their source image's); FD: Frechet distance of the samples' "
              f"and the real test split's embeddings in that classifier; floor: the same distance for as many real "
              f"training images, {_interval(floor)}. Target columns: the verdict of the t-interval against the "
              f"target: met or missed when the whole interval lies on one side of it, else inconclusive.")))
    accuracy = combined["classifier_accuracy"]
    section.notes.append(
        f"The evaluation classifier, trained on real images alone: test accuracy {_interval(accuracy)} (mean over "
        f"{accuracy['seeds']} seeds, {accuracy['items']} test images; each seed's: "
        f"{', '.join(_interval(q['classifier_accuracy']) for q in per_seed)}); target >= {REAL_ACCURACY_TARGET:.0%}: "
        f"{accuracy['target']}.")
    section.tables.append(Table(
        "each seed", ["seed", "shard set", "class agreement [exact 95 %]", "FD [bootstrap 95 %]", "floor [bootstrap 95 %]"],
        [[seed, name, _interval(row["class_agreement"]), _interval(row["frechet_distance"]),
          _interval(q["floor"]["frechet_distance"])] for seed, q in enumerate(per_seed) for name, row in q["sets"].items()],
        folded=True))
    section.data = {"combined": combined, "per_seed": per_seed}
    return section


def times_section(seconds: list[dict[str, float]], memory: dict[str, float], memorization: float) -> Section:
    section = Section("times", "Seconds per stage and peak memory")
    columns = [*STAGES, "sample quality"]
    rows = [[seed, *(s.get(c, 0.0) for c in columns), round(sum(s.get(c, 0.0) for c in columns), 1)]
            for seed, s in enumerate(seconds)]
    total = round(sum(row[-1] for row in rows) + memorization, 1)
    section.tables.append(Table(
        "seconds per stage", ["seed", *columns, "total"], rows + [["memorization study, every seed", *[""] * len(columns),
                                                                     memorization], ["study", *[""] * len(columns), total]],
        note="wall seconds of the sitting that finished each stage of each seed (a stage an earlier, stopped "
             "sitting had begun counts only the rest); the memorization study trains all its seeds' models as "
             "parallel tasks, so it has one figure"))
    section.notes.append(f"peak resident memory: {memory['self']:.2f} GiB in the study's process, {memory['children']:.2f} "
                         "GiB in the largest finished child process (ru_maxrss)")
    section.data = {"seconds": seconds, "peak_memory_gib": memory}
    return section


def seed_reports_section(reports: list[str], out: Path) -> Section:
    section = Section("seed-reports", "Each seed's own report")
    section.tables.append(Table("reports", ["seed", "report (relative to the study's report folder)"],
                                [[seed, str(Path("..") / Path(r).relative_to(out))] for seed, r in enumerate(reports)]))
    return section


def _demo_settings(demo: DemoConfig) -> Section:
    section = settings_section(demo, "Demo settings of every seed (seed-K: out and seed differ)")
    section.key = "demo-settings"  # the study's own settings close the report under "settings"
    return section


# --------------------------------------------------------------------------------------------
# The study


def peak_memory_gib() -> dict[str, float]:
    """Peak resident memory (ru_maxrss, KiB on Linux) of this process and of its largest finished child."""
    return {who: round(resource.getrusage(flag).ru_maxrss / 2 ** 20, 3)
            for who, flag in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}


def first_sitting_seconds(target: Path, key: dict[str, Any], seconds: Any) -> Any:
    """The seconds of the sitting that first finished a part of the study (a seed's stages, the memorization
    study), kept in `target` for the config `key`: a later sitting reuses every stage and would record only
    the reuse."""
    saved = saved_result(target, key)
    if saved is None:
        saved = {"config": key, "seconds": seconds}
        write_json_atomic(target, saved)
    return saved["seconds"]


def run_study(config: StudyConfig, *, address: str | None = None) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    size, _ = config.preset(gpu)
    demos = [config.demo_config(seed, gpu) for seed in range(config.seeds)]
    items = config.judge_items or demos[0].num_samples
    findings, quality, seconds, reports = [], [], [], []
    # the study's own bar (stderr, one step per seed and one for the memorization study) over the demo's
    # per-stage lines and bars
    bar = tqdm(total=config.seeds + 1, desc="study", unit="part", position=0, leave=True)
    for demo in demos:
        print(f"\n=== seed {demo.seed + 1} of {config.seeds}: {demo.dataset} -> {demo.out}", flush=True)
        summary = run_demo(demo, address=address)
        quality.append(_judge(demo, items, config.judge_resamples))
        stages = first_sitting_seconds(Path(demo.out) / "stage-seconds.json", config_dict(demo), summary["seconds"])
        seconds.append({**stages, "sample quality": quality[-1]["seconds"]})
        findings.append(summary["findings"])
        reports.append(summary["report"])
        bar.update(1)
    print(f"\n=== memorization study ({config.seeds} seeds) -> {out / 'memorization'}", flush=True)
    started = time.perf_counter()
    # actors = 0 (no Ray) for the demo's jobs means the same for the memorization study's runs
    memorization = run_emm_study(config.memorization_config(gpu), out / "memorization", address=address,
                                 in_process=demos[0].actors == 0)
    memorization_seconds = float(first_sitting_seconds(out / "memorization" / "study-seconds.json",
                                                       memorization["config"], round(time.perf_counter() - started, 1)))
    bar.update(1)
    bar.close()
    combined = combine_seeds(findings) + memorization["findings"]
    combined_quality = combine_quality(quality)
    memory = peak_memory_gib()
    lead = [study_findings(combined, demos[0].dataset), quality_section(combined_quality, quality),
            times_section(seconds, memory, memorization_seconds), seed_reports_section(reports, out),
            _demo_settings(demos[0])]
    report_dir = out / "report"
    write_report(report_dir, results=[str(Path(d.out) / "eval") for d in demos] + [str(out / "memorization")],
                 samples={name: str(Path(demos[0].out) / "shards" / name) for name in JUDGED_SETS},
                 title=f"tailforge study: {demos[0].dataset}, {config.seeds} seeds", lead=lead, settings=config)
    study = {"config": config_dict(config), "gpu": gpu, "image_size": size, "demo_config": config_dict(demos[0]),
             "findings": combined, "sample_quality": {"combined": combined_quality, "per_seed": quality},
             "seconds": seconds, "memorization_seconds": memorization_seconds,
             "memorization": {k: memorization[k] for k in ("config", "emm", "ratios")},
             "peak_memory_gib": memory, "seed_reports": reports,
             "report": str(report_dir / "report.html")}
    write_json_atomic(out / "study.json", study)
    print_study(study)
    return study


def print_study(study: dict[str, Any]) -> None:
    print()
    for row in study["findings"]:
        print(f"[{row['verdict']:>12}] {row['paper']}: {row['finding']}")
        print(f"{'':15}{row['difference']}: {Interval(row['estimate'], row['low'], row['high'], row['level'], row['method'], row['items'], row['seeds'])} "
              f"({row['items']} items, {row['seeds']} seeds)")
    accuracy = study["sample_quality"]["combined"]["classifier_accuracy"]
    print(f"\nevaluation classifier (real images only): test accuracy {_interval(accuracy)}, "
          f">= {REAL_ACCURACY_TARGET:.0%} {accuracy['target']}")
    print(f"{'shard set':<16}{'class agreement':>28}{'FD / floor':>24}")
    for name, row in study["sample_quality"]["combined"]["sets"].items():
        print(f"{name:<16}{_interval(row['class_agreement']):>28}{_interval(row['fd_over_floor'], 2):>24}")
    total = sum(sum(s.values()) for s in study["seconds"])
    print(f"\nseconds: {total:.0f} over {len(study['seconds'])} seeds; peak memory {study['peak_memory_gib']} GiB")
    print(f"report: {study['report']}\nstudy: {Path(study['report']).parents[1] / 'study.json'}")
