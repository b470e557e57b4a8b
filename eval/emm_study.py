"""`tailforge eval emm-study`: the memorization findings of Gu et al. 2023 and Yoon et al. 2023 over several seeds.

Per seed K, under one training procedure (the same epochs for every run, Gu et al. 2023 App. B, so every
training image is drawn equally often whatever the set's size), five EMM runs (tailforge.eval.emm, each
cached and resumable) in OUT/seed-K/<run>:

* ``sizes``: nested subsets of every size with true labels, EMM at epsilon (Gu et al. 2023 Def. 1);
* ``dummy``: the ``variant_size`` subset plus Gaussian-mixture dummy images as one extra class (Yoon et al.
  2023 Hypothesis 2). Its control is the sweep's run at that size: the same real images, seen as often
  (fixed epochs), so the comparison is exposure-matched;
* ``random`` / ``unique``: the same subset conditioned on random labels over the dataset's classes or on one
  label per image (Gu et al. 2023 Sec. 6), the same control;
* ``imbalance``: a majority and a minority class only (``class_counts``; Yoon et al. 2023 Hypothesis 3).

Each finding is a difference of memorization ratios, each ratio over a run's generated samples at the
snapshot with the highest ratio (Gu et al. 2023 reports the highest over training); within a seed its
interval is a two-sample bootstrap over the samples of the two runs (different models), across seeds
:func:`tailforge.eval.findings.combine_seeds` gives the t-interval, and the verdict follows the rule of
:func:`tailforge.eval.stats.verdict`. Every run of every seed is one Ray task (or runs in this process).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tailforge.eval.config import EMM_STUDY_RUNS, EMMStudyConfig, parse_class_counts
from tailforge.eval.emm import run_emm, run_name, run_point
from tailforge.eval.findings import Claim, combine_seeds, decide
from tailforge.eval.results import tag_result
from tailforge.eval.stats import Interval, decode_bits, t_interval, two_sample_bootstrap
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict, read_json, write_json_atomic

Runs = dict[str, dict[str, Any]]  # one seed's run results: "n10", "n25", ... (the sweep), "dummy", "random", ...


def best_snapshot(result: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with the highest memorization ratio (the first of equals)."""
    return max(result["snapshots"], key=lambda s: s["memorization_ratio"])


def replicate_bits(result: dict[str, Any]) -> np.ndarray:
    """Per generated sample of the best snapshot: 1 where the ratio criterion holds."""
    return decode_bits(best_snapshot(result)["replicate"]).astype(np.float64)


def class_bits(result: dict[str, Any], cls: int) -> np.ndarray:
    """replicate_bits of the samples generated for class `cls` (the run's balanced labels over its
    sampled classes, as eval.emm.run_point draws them)."""
    classes = result["sampled_classes"]
    labels = np.asarray(classes)[np.arange(len(replicate_bits(result))) % len(classes)]
    return replicate_bits(result)[labels == cls]


def _between(control: str, treated: str) -> Callable[[Runs], Interval]:
    return lambda runs: two_sample_bootstrap(replicate_bits(runs[control]), replicate_bits(runs[treated]))


def study_claims(config: EMMStudyConfig) -> tuple[Claim, ...]:
    """The findings an EMM study checks, with the runs each compares."""
    smallest, largest = run_name(min(config.sizes, key=lambda n: n or 10**9)), \
        run_name(max(config.sizes, key=lambda n: n or 10**9))
    control = run_name(config.variant_size)
    (major, _), (minor, _) = sorted(parse_class_counts(config.class_counts).items(), key=lambda kv: -kv[1])
    return (
        Claim("Gu et al. 2023; Yoon et al. 2023", "memorization falls as the training set grows (Gu et al. 2023 "
              "Fig. 1c, the premise of EMM)", f"memorization ratio, {largest} - {smallest} (fixed epochs)",
              "less", 0.0, _between(smallest, largest)),
        Claim("Yoon et al. 2023", "injected Gaussian-mixture dummy images turn memorization into generalization "
              "(Hypothesis 2)", f"memorization ratio, {control} + {config.dummy} dummies - {control} alone "
              "(each real image seen equally often)", "less", 0.0, _between(control, "dummy")),
        Claim("Gu et al. 2023", "random labels over the dataset's classes memorize about as much as true labels "
              "(Sec. 6: no rise of 10 points)", f"memorization ratio, {control} random labels - true labels",
              "not_greater", 0.1, _between(control, "random")),
        Claim("Gu et al. 2023", "unique labels (one class per image) raise memorization (Sec. 6, Table 3)",
              f"memorization ratio, {control} unique labels - true labels", "greater", 0.0,
              _between(control, "unique")),
        Claim("Yoon et al. 2023", "the minority class is memorized while the majority class generalizes "
              "(Hypothesis 3)", f"memorization ratio of class {minor}'s samples - class {major}'s "
              f"({', '.join(config.class_counts)} training images)", "greater", 0.0,
              lambda runs: two_sample_bootstrap(class_bits(runs["imbalance"], major),
                                                class_bits(runs["imbalance"], minor))),
    )


def run_folders(config: EMMStudyConfig, out: Path) -> dict[tuple[int, str], Path]:
    """(seed, run) -> the EMM output folder of that run (an eval emm layout: emm.json, runs/nN/)."""
    return {(seed, run): out / f"seed-{seed}" / run for seed in range(config.seeds) for run in EMM_STUDY_RUNS}


def _calls(config: EMMStudyConfig, folders: dict[tuple[int, str], Path]) -> list[tuple]:
    """eval.emm.run_point's arguments for every (seed, run, size), the largest first (they take longest)."""
    calls = [(config.run_config(run, seed), size, str(folder / "runs" / run_name(size)))
             for (seed, run), folder in folders.items() for size in config.run_config(run, seed).sizes]
    return sorted(calls, key=lambda c: -(c[0].epochs * (c[1] or 10**6) + c[0].dummy))


def run_emm_study(config: EMMStudyConfig, out: str | Path, *, address: str | None = None, in_process: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Every run of every seed (Ray tasks, or in this process), each seed's emm.json per run, the findings per
    seed and across seeds; writes OUT/emm-study.json."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders = run_folders(config, out)
    calls = _calls(config, folders)
    bar = tqdm(total=len(calls), desc="EMM study models", unit="model", disable=not progress)
    if in_process:
        for call in calls:
            run_point(*call)
            bar.update(1)
    else:
        from tailforge.gen.jobs.ray import run_tasks

        for result in run_tasks(run_point, calls, address=address):
            bar.update(1)
            bar.set_postfix(last=f"seed {result['config']['seed']} n={result['num_train']}: "
                                 f"{result['max_memorization_ratio']:.3f}")
    bar.close()
    # every run is finished and cached now: each run's emm.json (EMM, the report's plot) costs no training
    reports = {key: run_emm(config.run_config(key[1], key[0]), folder, in_process=True, progress=False)
               for key, folder in folders.items()}
    per_seed_runs: list[Runs] = []
    for seed in range(config.seeds):
        runs: Runs = {}
        for run in EMM_STUDY_RUNS:
            for point in reports[(seed, run)]["points"]:
                result = read_json(folders[(seed, run)] / "runs" / point["run"] / "result.json", "EMM run result")
                runs[point["run"] if run == "sizes" else run] = result
        per_seed_runs.append(runs)
    claims = study_claims(config)
    per_seed = [decide(runs, claims) for runs in per_seed_runs]
    emm_values = [reports[(seed, "sizes")]["emm"].get("emm") for seed in range(config.seeds)]
    study = tag_result("emm_study", {
        "config": config_dict(config), "findings": combine_seeds(per_seed),
        "emm": _emm_across_seeds(emm_values, config),
        "ratios": _ratios(per_seed_runs),
        "runs": {f"seed-{seed}/{run}": str(folder / "emm.json") for (seed, run), folder in folders.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "note": "wall_seconds counts only the runs this invocation computed; reused runs cost nothing"})
    write_json_atomic(out / "emm-study.json", study)
    return study


def _emm_across_seeds(values: list[float | None], config: EMMStudyConfig) -> dict[str, Any]:
    """EMM per seed and their t-interval; a seed whose sizes do not bracket 1 - epsilon has no EMM, and
    then no interval is given (the sweep needs other sizes)."""
    if any(v is None for v in values):
        return {"per_seed": values, "interval": None,
                "note": f"the sizes {config.sizes} do not bracket a ratio of {1 - config.epsilon:g} in every seed"}
    return {"per_seed": values, "interval": t_interval(values).as_dict()}


def _ratios(per_seed_runs: list[Runs]) -> dict[str, dict[str, Any]]:
    """Each run's highest memorization ratio per seed and their t-interval across seeds."""
    names = list(per_seed_runs[0])
    if any(list(runs) != names for runs in per_seed_runs):
        raise ConfigError("the seeds of an EMM study ran different runs")
    rows = {}
    for name in names:
        values = [best_snapshot(runs[name])["memorization_ratio"] for runs in per_seed_runs]
        rows[name] = {"per_seed": values, "num_train": per_seed_runs[0][name]["num_train"],
                      "epochs": per_seed_runs[0][name]["training_epochs"],
                      "interval": t_interval(values, items=len(replicate_bits(per_seed_runs[0][name]))).as_dict()}
    return rows

