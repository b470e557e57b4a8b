"""`tailforge eval report`: every evaluation result in one report.json and one self-contained
report.html (figures embedded as PNG data URIs: it opens offline, from any folder).

Inputs are the JSON files the evaluation commands write (any file name works: each says its
"kind" and "version", :mod:`tailforge.eval.results`), shard sets for sample grids and density
histograms, and classifiers trained on reconstructed data for accuracy vs t_re. REPORT_SECTIONS
holds one section builder per result kind. A JSON of no known kind or version, or one its builder
cannot read, is listed as not recognised; a section whose inputs are absent is reported as absent
with the reason; nothing is filled in. Every figure carries the source file and the config that
produced it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tailforge.eval.figures import data_uri, image_grid, pil_data_uri
from tailforge.eval.results import RESULT_VERSIONS
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import read_json, write_json_atomic

TEMPLATE = Path(__file__).with_name("report_template.html")

#: result files of one kind: (path, parsed JSON)
Results = list[tuple[Path, dict[str, Any]]]


@dataclasses.dataclass
class Figure:
    title: str
    uri: str  # data URI of the PNG
    caption: str  # what it shows and where it came from
    config: dict[str, Any]  # the config that produced it


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """What sections draw on besides result files."""

    samples: dict[str, str]  # --samples NAME=SHARDS: sets for grids and density histograms
    classifier: str | None  # --classifier: the evaluation classifier of the density histograms
    dataset: str | None  # --dataset: the real data (density reference, t_re test split)
    tre: dict[float, str]  # --tre T=CLASSIFIER_DIR: classifiers trained on data reconstructed at t_re


@dataclasses.dataclass
class Section:
    key: str
    title: str
    absent: str | None = None  # why the section has no content
    figures: list[Figure] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # numbers that go to report.json

    def to_json(self) -> dict[str, Any]:
        if self.absent:
            return {"title": self.title, "absent": self.absent}
        return {"title": self.title, "data": self.data, "notes": self.notes,
                "tables": [dataclasses.asdict(t) for t in self.tables],
                "figures": [{"title": f.title, "caption": f.caption, "config": f.config} for f in self.figures]}


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg). Each refuses to draw an empty plot.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _literal_text(draw: Callable[..., str]) -> Callable[..., str]:
    """Draw with every text taken literally: titles, labels and legends carry names from result
    files and shard sets, and matplotlib would read ``$...$`` in them as mathtext (a name like
    ``$\\frac{1}{0}$`` fails to parse, others change what is shown) or hand them to LaTeX."""

    @functools.wraps(draw)
    def literal(*args, **kwargs) -> str:
        _plt()
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)

    return literal


def _fig_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return data_uri(buf.getvalue())


def _require(points: int, what: str) -> None:
    if points < 1:
        raise ValueError(f"no data to plot for {what}")


@_literal_text
def histogram_figure(series: dict[str, np.ndarray], xlabel: str, title: str) -> str:
    plt = _plt()
    _require(sum(len(v) for v in series.values()), title)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    bins = np.linspace(*np.percentile(finite, [0.5, 99.5]), 40) if np.ptp(finite) > 0 else 10
    for name, values in series.items():
        ax.hist(values[np.isfinite(values)], bins=bins, histtype="step", density=True, linewidth=1.6,
                label=f"{name} (n={len(values)}, median {np.median(values):.3g})")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=7)
    return _fig_uri(fig)


@_literal_text
def line_figure(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, *,
                logx: bool = False, hline: tuple[float, str] | None = None,
                markers: dict[str, tuple[float, float]] | None = None, ylim: tuple[float, float] | None = None) -> str:
    plt = _plt()
    _require(sum(len(x) for x, _ in series.values()), title)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    if hline:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    for name, (x, y) in (markers or {}).items():
        ax.plot([x], [y], marker="*", markersize=14, linestyle="none", color="crimson", label=name)
    if logx:
        ax.set_xscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _fig_uri(fig)


@_literal_text
def bar_figure(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
               hlines: dict[str, float] | None = None) -> str:
    plt = _plt()
    _require(len(groups) * len(series), title)
    fig, ax = plt.subplots(figsize=(max(5.2, 0.45 * len(groups) * max(1, len(series))), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, values, width, label=name)
    for name, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.text(len(groups) - 0.5, value, name, fontsize=7, ha="right", va="bottom")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.legend(fontsize=7)
    return _fig_uri(fig)


@_literal_text
def roc_figure(sets: dict[str, dict[str, Any]], title: str) -> str:
    plt = _plt()
    _require(len(sets), title)
    fig, axes = plt.subplots(1, len(sets), figsize=(3.3 * len(sets), 3.4), squeeze=False)
    for ax, (name, result) in zip(axes[0], sets.items()):
        for score, values in result["scores"].items():
            ax.plot(values["roc"]["fpr"], values["roc"]["tpr"], linewidth=1.2,
                    label=f"{score} {values['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set(title=f"{name} ({result.get('kind', '')})", xlabel="FPR (OOD kept)", ylabel="TPR (ID kept)")
        ax.legend(fontsize=6, title="AUROC", title_fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _fig_uri(fig)


# --------------------------------------------------------------------------------------------
# Helpers


def _fmt(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    return "-" if value is None else value


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _embedded_png(section: Section, result: Path, name: Any) -> str | None:
    """The data URI of the PNG that a result file names (relative to its own folder), or None when
    it names none or the file is absent. Only a PNG inside the result's folder is read: a name that
    is absolute, holds '..' or resolves (through a symlink) outside the folder, or a file that is not
    a PNG, is not embedded and the section says so (a result JSON must not pull other files of
    the machine into a report that is shared)."""
    if name in (None, ""):
        return None
    folder = result.parent.resolve()
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        section.notes.append(f"{result}: image {str(name)[:200]!r} not embedded: not a file name inside the "
                             "result's folder")
        return None
    target = (result.parent / name).resolve()
    if folder not in target.parents:
        section.notes.append(f"{result}: image {name!r} not embedded: it leads outside the result's folder "
                             "(a symlink)")
        return None
    if not target.is_file():
        return None
    data = target.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        section.notes.append(f"{result}: image {name!r} not embedded: not a PNG file")
        return None
    return data_uri(data)


def _unrecognised(path: Path, reason: str) -> dict[str, str]:
    return {"path": str(path), "reason": reason}


def _not_json(constant: str) -> None:
    """json.loads takes NaN and Infinity, which are not JSON (and report.json could not hold them)."""
    raise ValueError(f"{constant} is not JSON")


def read_result(path: Path) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(kind, parsed JSON, None) for a result the report reads, else (None, None, why it does not)."""
    try:
        obj = json.loads(path.read_text(), parse_constant=_not_json)
    except (ValueError, OSError, RecursionError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError, NaN
        return None, None, f"not readable JSON ({type(err).__name__}: {str(err)[:120]})"
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in RESULT_VERSIONS:
        return None, None, "no known result kind" if kind is None else f"unknown result kind {kind!r}"
    if obj.get("version") != RESULT_VERSIONS[kind]:
        return None, None, (f"{kind} result of version {obj.get('version')!r}; this report reads version "
                            f"{RESULT_VERSIONS[kind]}")
    return kind, obj, None


def discover(paths: list[str]) -> tuple[dict[str, Results], list[dict[str, str]]]:
    """Results by kind, and the JSON files not recognised (path and reason). Results of a kind
    that another kind's result refers to (READ_THROUGH) are neither."""
    found: dict[str, Results] = {kind: [] for kind in REPORT_SECTIONS}
    unrecognised = []
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            folder = path.resolve()
            for file in sorted(p for p in path.rglob("*.json") if not p.name.startswith(("_", "."))):
                if folder in file.resolve().parents:
                    files.append(file)
                else:  # its content would end up in report.json
                    unrecognised.append(_unrecognised(file, f"a symlink leading outside {raw}; not read"))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--results {raw}: no such file or folder")
    for file in dict.fromkeys(files):
        kind, obj, reason = read_result(file)
        if reason:
            unrecognised.append(_unrecognised(file, reason))
        elif kind not in READ_THROUGH:
            found[kind].append((file, obj))
    return found, unrecognised


# --------------------------------------------------------------------------------------------
# Sections


def samples_section(samples: dict[str, str], grid: int) -> Section:
    """Sample grids of each shard set, the first `grid` samples by global index: sets generated
    with the same job seed start from the same noise, so the grids are paired image by image."""
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.data.shards.format import JOB_FILE

    section = Section("samples", "Samples (same seeds, same positions)")
    if not samples:
        section.absent = "no --samples NAME=SHARDS given"
        return section
    seeds = {}
    for name, root in samples.items():
        data = load_dataset(f"shards:{root}", "train")
        order = sorted(range(len(data)), key=lambda i: data.keys[i])[:grid]
        job = read_json(Path(root) / JOB_FILE, "job file") if (Path(root) / JOB_FILE).is_file() else {}
        seeds[name] = job.get("seed")
        config = {"shards": root, **{k: v for k, v in job.items() if not isinstance(v, (dict, list))},
                  **{k: v for k, v in (job.get("sampling") or {}).items()}}
        uri = pil_data_uri(image_grid(data.images[torch.tensor(order)], 10))
        section.figures.append(Figure(
            f"{name}", uri, f"{name}: the first {len(order)} samples by index (class = index mod C), from {root}", config))
    if len(set(seeds.values())) > 1:
        section.notes.append(f"the sets were generated with different job seeds {seeds}: the grids are not paired")
    section.data = {"sets": samples, "seeds": seeds}
    return section


def density_section(section: Section, results: Results) -> None:
    for path, obj in results:
        rows = []
        for name in ("samples", "real_test"):
            part = obj[name]
            rows.append([name] + [_fmt((part.get(m) or {}).get("median")) for m in ("hardness", "avg_knn", "lof")]
                        + [_fmt(part.get("precision")), _fmt(part.get("recall")), _fmt(part.get("accuracy"))])
        section.tables.append(Table(f"{path} (shards {obj.get('shards')}, classifier {obj.get('classifier')})",
                                    ["set", "median hardness", "median AvgkNN", "median LOF", "precision", "recall",
                                     "classifier accuracy"], rows))
        section.data[str(path)] = {k: obj[k] for k in ("samples", "real_test")}


def density_histograms(section: Section, inputs: ReportInputs) -> None:
    """Histograms of hardness, AvgkNN and LOF of each --samples set and the real test split."""
    from tailforge.eval import density
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import embed, load_classifier

    samples, classifier, dataset = inputs.samples, inputs.classifier, inputs.dataset
    if not samples:
        return
    if not (classifier and dataset):
        section.notes.append("histograms need --classifier (an evaluation classifier) and --dataset")
        return
    net, _ = load_classifier(classifier)
    config = density.DensityConfig()
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    reference = density.real_reference(embed(net, train.images), train.labels, train.info.num_classes, config)
    values: dict[str, dict[str, np.ndarray]] = {}
    for name, root in samples.items():
        density.check_independent(classifier, density.read_shard_set(root)[2])
        data = load_dataset(f"shards:{root}", "train")
        values[name] = {k: v.numpy() for k, v in density.density_metrics(embed(net, data.images), data.labels,
                                                                           reference, config).items()}
    values["real test"] = {k: v.numpy() for k, v in density.density_metrics(embed(net, test.images), test.labels,
                                                                              reference, config).items()}
    cfg = {"classifier": classifier, "dataset": dataset, **dataclasses.asdict(config), "sets": samples}
    for metric, label in (("hardness", "hardness (Eq. 3)"), ("avg_knn", f"AvgkNN (k={config.k})"), ("lof", "LOF")):
        uri = histogram_figure({n: v[metric] for n, v in values.items()}, label, f"{label} in {classifier}'s features")
        section.figures.append(Figure(label, uri, f"{label} of each set against the real training split of {dataset}", cfg))
        section.data.setdefault("medians", {})[metric] = {n: float(np.median(v[metric])) for n, v in values.items()}


def accuracy_section(section: Section, results: Results) -> None:
    rows = []
    for path, obj in results:
        rows.append([str(path), obj.get("classifier"), obj.get("dataset"), "plain", obj.get("n"), _fmt(obj["top1"]),
                     _fmt(obj.get("ece"))])
        if "diffaug_ensemble" in obj:
            de = obj["diffaug_ensemble"]
            rows.append([str(path), obj.get("classifier"), obj.get("dataset"), f"DiffAug-Ensemble ({de.get('model')})",
                         de.get("n"), _fmt(de["top1"]), _fmt(de.get("ece"))])
    section.tables.append(Table("accuracy", ["source", "classifier", "dataset", "mode", "n", "top-1", "ECE"], rows))
    section.data["accuracy"] = {str(p): o for p, o in results}


def accuracy_vs_tre(section: Section, inputs: ReportInputs) -> None:
    """Test accuracy of the --tre classifiers, trained on data reconstructed at each t_re."""
    if not inputs.tre:
        return
    tre, dataset = inputs.tre, inputs.dataset
    points = _tre_points(tre, dataset)
    section.data["accuracy_vs_t_re"] = points
    uri = line_figure({"test accuracy": ([p["t_re"] for p in points], [p["test_accuracy"] for p in points])},
                      "t_re (fraction of T)", "test accuracy", "classifiers trained on reconstructed data "
                      "(Yamaguchi & Fukuda 2023 Table 2)")
    section.figures.append(Figure("accuracy vs t_re", uri, "test accuracy of a classifier trained on each "
                                  "reconstructed set; t_re = 0 is real data, 1 is full generation",
                                  {"classifiers": {str(k): v for k, v in tre.items()}, "dataset": dataset}))


def _tre_points(tre: dict[float, str], dataset: str | None) -> list[dict[str, Any]]:
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import load_classifier, predict_logits

    test = load_dataset(dataset, "test") if dataset else None
    points = []
    for t_re, folder in sorted(tre.items()):
        net, config = load_classifier(folder)
        if test is not None:
            accuracy = float((predict_logits(net, test.images).argmax(1) == test.labels).double().mean())
        elif "test_accuracy" in config:
            accuracy = float(config["test_accuracy"])
        else:
            raise ConfigError(f"{folder} records no test_accuracy; pass --dataset to evaluate it")
        points.append({"t_re": t_re, "classifier": folder, "test_accuracy": accuracy,
                       "trained_on": (config.get("train_config") or {}).get("dataset")})
    return points


def corruption_section(section: Section, results: Results) -> None:
    labels = {str(p): _run_label(o.get("config")) or str(p) for p, o in results}
    names = list(results[0][1]["corruptions"])
    series = {labels[str(p)]: [o["corruptions"].get(n, {}).get("mean_accuracy", np.nan) for n in names] for p, o in results}
    clean = {f"clean {labels[str(p)]}": o["clean_accuracy"] for p, o in results}
    configs = {labels[str(p)]: {**(o.get("config") or {}), "reference_size": o.get("reference_size"),
                                "severities": o.get("severities"), "source": str(p)} for p, o in results}
    section.figures.append(Figure("mean accuracy per corruption", bar_figure(
        names, series, "accuracy (mean over severities)", "accuracy per corruption", hlines=clean),
        "accuracy per corruption averaged over severities; dashed: clean accuracy", configs))
    sev = {labels[str(p)]: ([int(s) for s in o["per_severity"]], list(o["per_severity"].values()))
           for p, o in results if o.get("per_severity")}
    if sev:
        section.figures.append(Figure("accuracy vs severity", line_figure(
            sev, "severity", "mean accuracy over corruptions", "accuracy vs severity", ylim=(0, 1.02)),
            "mean over the benchmark corruptions included in the mean", configs))
    for path, obj in results:
        examples = _embedded_png(section, path, obj.get("examples_png"))
        if examples:
            section.figures.append(Figure(f"examples {labels[str(path)]}", examples,
                                          "rows: " + ", ".join(obj.get("example_rows", [])) +
                                          "; columns: clean, then severities " + str(obj.get("severities")),
                                          configs[labels[str(path)]]))
        section.tables.append(Table(
            f"{labels[str(path)]}: clean {obj['clean_accuracy']:.4f}, mean corruption accuracy "
            f"{_fmt(obj['mean_corruption_accuracy'])}",
            ["corruption", "family", "in mean"] + [f"sev {c['severity']}" for c in next(iter(obj["corruptions"].values()))["severities"]]
            + ["unchanged at sev 5"],
            [[n, r["family"], "yes" if n in obj["included_in_mean"] else "no"] + [_fmt(c["accuracy"], 3) for c in r["severities"]]
             + [_fmt(r["severities"][-1]["unchanged_fraction"], 2)] for n, r in obj["corruptions"].items()]))
        section.tables.append(Table(f"{labels[str(path)]}: families", ["family", "mean accuracy"],
                                    [[f, _fmt(v)] for f, v in obj["families"].items()]))
        if obj.get("not_computed"):
            section.notes.append(f"{labels[str(path)]}: not computed: " +
                                 "; ".join(f"{k} ({v})" for k, v in obj["not_computed"].items()))
        if obj.get("no_effect_at_this_size"):
            section.notes.append(f"{labels[str(path)]}: no effect at {obj.get('image_size')} px (left out of the "
                                 f"means): {', '.join(obj['no_effect_at_this_size'])}")
        section.data[str(path)] = {k: obj[k] for k in ("clean_accuracy", "mean_corruption_accuracy", "families",
                                                       "per_severity", "included_in_mean")}


def _run_label(config: dict[str, Any] | None) -> str:
    config = config or {}
    label = Path(str(config.get("classifier") or "")).name or str(config.get("model") or "")
    if config.get("diffaug_ensemble"):
        label += " + DiffAug-Ensemble"
    return label


def ood_section(section: Section, results: Results) -> None:
    for path, obj in results:
        label = _run_label(obj.get("config")) or str(path)
        config = {**(obj.get("config") or {}), "source": str(path)}
        section.figures.append(Figure(f"ROC {label}", roc_figure(obj["sets"], f"ROC curves: {label}"),
                                      "one panel per OOD set; legend: score and AUROC", config))
        scores = obj["scores_computed"]
        # FPR@95 in both conventions: ID positive (the classic figure) and OOD positive (OpenOOD v1.5)
        section.tables.append(Table(f"{label}: AUROC / FPR@95 ID-positive / FPR@95 OOD-positive",
                                    ["OOD set", "kind"] + scores,
                                    [[name, r.get("kind", "")] + [
                                        f"{r['scores'][s]['auroc']:.3f} / {r['scores'][s]['fpr95']:.3f} / "
                                        f"{r['scores'][s]['fpr95_ood_positive']:.3f}" for s in scores]
                                     for name, r in obj["sets"].items()]))
        if obj.get("scores_not_applicable"):
            section.notes.append(f"{label}: not applicable: " +
                                 "; ".join(f"{k} ({v})" for k, v in obj["scores_not_applicable"].items()))
        section.data[str(path)] = {"mean_over_sets": obj["mean_over_sets"],
                                   "auroc": {n: {s: v["auroc"] for s, v in r["scores"].items()} for n, r in obj["sets"].items()}}


def fidelity_section(section: Section, results: Results) -> None:
    rows = []
    for path, obj in results:
        cfg = obj.get("config") or {}
        rows.append([cfg.get("shards"), cfg.get("classifier"), _fmt(obj["frechet_distance"]),
                     _fmt(obj.get("frechet_distance_real_test_vs_train")),
                     _fmt(obj["fake_detection"]["pixel"]["accuracy"]), _fmt(obj["fake_detection"]["dct"]["accuracy"])])
        section.data[str(path)] = {k: obj[k] for k in ("frechet_distance", "fake_detection")}
    section.tables.append(Table("fidelity", ["shards", "feature classifier", "Frechet distance", "FD real test vs train",
                                             "fake detection (pixel)", "fake detection (DCT)"], rows))
    section.notes.append("fake detection: cross-validated accuracy of a linear real-vs-synthetic detector; 0.5 means "
                         "indistinguishable")


def memorization_section(section: Section, results: Results) -> None:
    rows = []
    hist = {}
    for path, obj in results:
        cfg = {**(obj.get("config") or {}), "source": str(path)}
        label = cfg.get("shards") or cfg.get("samples") or str(path)
        rows.append([label, obj.get("config", {}).get("dataset"), obj["num_generated"], obj["num_train"],
                     _fmt(obj["memorization_ratio"]), obj["distinct_train_images_replicated"],
                     _fmt(obj["median_ratio_d1_d2"]), _fmt((obj.get("feature_space") or {}).get("generated_over_heldout_mean"))])
        hist[label] = obj["ratio_histogram"]
        grid = _embedded_png(section, path, obj.get("nearest_pairs_png"))
        if grid:
            section.figures.append(Figure(f"closest pairs {label}", grid, "the generated images closest to the training "
                                          "set (top of each pair) above their nearest training image", cfg))
        if obj.get("per_class"):
            section.tables.append(Table(f"{label}: per class", ["class", "generated", "training images",
                                                                "memorization ratio", "distinct replicated"],
                                        [[c["name"], c["generated"], c["train_images"], _fmt(c["memorization_ratio"]),
                                          c["distinct_train_images_replicated"]] for c in obj["per_class"]]))
        section.data[str(path)] = {k: obj.get(k) for k in ("memorization_ratio", "distinct_train_images_replicated",
                                                          "median_ratio_d1_d2", "feature_space")}
    section.tables.insert(0, Table("memorization", ["samples", "training data", "generated", "training images",
                                                    "memorization ratio", "distinct training images replicated",
                                                    "median d1/d2", "feature NN distance generated / held-out"], rows))
    series = {}
    for label, h in hist.items():
        centres = (np.array(h["edges"][:-1]) + np.array(h["edges"][1:])) / 2
        counts = np.array(h["counts"], dtype=float)
        series[label] = (centres.tolist(), (counts / max(counts.sum(), 1)).tolist())
    section.figures.insert(0, Figure("d1/d2 distribution", line_figure(
        series, "d1 / d2 (nearest / second-nearest training distance)", "fraction of samples",
        "distribution of d1/d2; replicates left of 1/3"), "samples with d1/d2 < 1/3 are replicates",
        {label: str(p) for (p, _), label in zip(results, hist)}))


def emm_section(section: Section, results: Results) -> None:
    series, markers, configs, rows = {}, {}, {}, []
    for path, obj in results:
        cfg = obj["config"]
        label = f"labels={cfg['labels']}" + (f", +{cfg['dummy']} GM dummies" if cfg.get("dummy") else "") + \
                f", {cfg['steps']} steps ({path.parent.name})"
        series[label] = ([p["size"] for p in obj["points"]], [p["memorization_ratio"] for p in obj["points"]])
        configs[label] = {**cfg, "source": str(path), "wall_seconds": obj.get("wall_seconds")}
        emm = obj["emm"]
        if emm.get("emm") is not None:
            markers[f"EMM {emm['emm']:.0f} ({label})"] = (emm["emm"], emm["threshold"])
        for p in obj["points"]:
            rows.append([label, p["size"], _fmt(p["memorization_ratio"]), p["distinct_train_images_replicated"],
                         _fmt(p["median_ratio_d1_d2"])])
        note = (f"{label}: EMM = {emm['emm']:.1f}, bracketed by n={emm['lower_size']} (ratio {emm['lower_ratio']:.3f}) "
                f"and n={emm['upper_size']} (ratio {emm['upper_ratio']:.3f})" if emm.get("emm") is not None
                else f"{label}: {emm.get('note')}")
        section.notes.append(note + f"; wall time {obj.get('wall_seconds')} s")
        section.data[str(path)] = {"points": obj["points"], "emm": emm, "config": cfg}
        for p in obj["points"]:
            grid = _embedded_png(section, path, f"runs/{p['run']}/nearest_pairs.png")
            if grid:
                section.figures.append(Figure(f"closest pairs, n={p['size']} ({label})", grid,
                                              f"n={p['size']}: ratio {p['memorization_ratio']:.3f}; generated (top) above "
                                              "nearest training image", {**cfg, "size": p["size"]}))
    threshold = 1 - results[0][1]["config"]["epsilon"]
    section.figures.insert(0, Figure("memorization ratio vs size", line_figure(
        series, "training-set size N (log)", "memorization ratio", "memorization ratio vs training-set size",
        logx=True, hline=(threshold, f"1 - eps = {threshold:g}"), markers=markers, ylim=(-0.02, 1.02)),
        "each point: one model trained on a nested subset, ratio over its generated samples", configs))
    section.tables.append(Table("points", ["study", "N", "memorization ratio", "distinct replicated", "median d1/d2"], rows))


# --------------------------------------------------------------------------------------------


def entropy_section(section: Section, results: Results) -> None:
    rows = []
    for path, obj in results:
        for spec, r in obj["datasets"].items():
            rows.append([str(path), obj.get("classifier"), spec, r["n"], _fmt(r["mean_entropy"]),
                         _fmt(r.get("max_entropy")), _fmt(r.get("top1"))])
        section.data[str(path)] = {k: obj.get(k) for k in ("classifier", "split", "datasets")}
    section.tables.append(Table("mean output entropy (nats)", ["source", "classifier", "dataset", "n", "mean entropy",
                                                               "maximum (log C)", "top-1"], rows))
    section.notes.append("lower entropy: samples the classifier finds easier, closer to the modes of the real data")


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    """The report section of one kind of result."""

    kind: str  # the result kind it reads (tailforge.eval.results.RESULT_VERSIONS)
    title: str  # its heading
    build: Callable[[Section, Results], None]  # adds tables, figures, notes and data for the results (at least one)
    absent: str  # why the section is empty when it ends with neither table nor figure
    from_inputs: Callable[[Section, ReportInputs], None] | None = None  # what it adds from other report inputs

    @property
    def version(self) -> int:
        """The result version it reads: the one the evaluation commands write now."""
        return RESULT_VERSIONS[self.kind]


#: one section per result kind, in report order (after the sample grids)
REPORT_SECTIONS: dict[str, SectionSpec] = {spec.kind: spec for spec in (
    SectionSpec("density", "Density: hardness, AvgkNN, LOF (Sehwag et al. 2022 Sec. 4.2)", density_section,
                "no density results (tailforge eval density --json) and no --samples with --classifier/--dataset",
                density_histograms),
    SectionSpec("accuracy", "Accuracy (top-1, ECE; with and without DiffAug-Ensemble) and accuracy vs t_re",
                accuracy_section, "no accuracy results (tailforge eval accuracy --json) and no --tre classifiers",
                accuracy_vs_tre),
    SectionSpec("corruptions", "Corruption robustness (CIFAR-10-C protocol)", corruption_section,
                "no corruptions results (tailforge eval corruptions)"),
    SectionSpec("ood", "OOD detection (OpenOOD postprocessors)", ood_section, "no ood results (tailforge eval ood)"),
    SectionSpec("fidelity", "Fidelity: Frechet distance and fake detection (Yamaguchi & Fukuda 2023 Sec. 4.1)", fidelity_section,
                "no fidelity results (tailforge eval fidelity)"),
    SectionSpec("memorization", "Memorization: ratio criterion d1 < d2/3 (Gu et al. 2023; Yoon et al. 2023)", memorization_section,
                "no memorization results (tailforge eval memorization)"),
    SectionSpec("emm", "Memorization ratio vs training-set size and EMM (Gu et al. 2023 Def. 1)", emm_section,
                "no emm results (tailforge eval emm)"),
    SectionSpec("entropy", "Output entropy of a classifier (Yamaguchi & Fukuda 2023, Eq. 4)", entropy_section,
                "no entropy results (tailforge eval entropy --json)"),
)}

#: result kinds read through another kind's result, not on their own: an EMM study's emm.json
#: lists its runs, and its section draws each run's figure from the run folder
READ_THROUGH: dict[str, str] = {"emm_run": "emm"}

#: what a builder raises on a result that has the right kind and version but not the content
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _built(spec: SectionSpec, results: Results) -> Section:
    section = Section(spec.kind, spec.title)
    if results:
        spec.build(section, results)
    return section


def build_section(spec: SectionSpec, results: Results, inputs: ReportInputs) -> tuple[Section, list[dict[str, str]]]:
    """The section of `results`, and the results its builder could not read (path and reason):
    when the whole set fails, each result is tried alone and the section is built from the
    ones that pass."""
    unreadable = []
    try:
        section = _built(spec, results)
    except MALFORMED:
        readable = []
        for path, obj in results:
            try:
                _built(spec, [(path, obj)])
            except MALFORMED as err:
                unreadable.append(_unrecognised(path, f"malformed {spec.kind} result ({type(err).__name__}: {err})"))
            else:
                readable.append((path, obj))
        section = _built(spec, readable)
    if spec.from_inputs:
        spec.from_inputs(section, inputs)
    if not section.tables and not section.figures:
        section.absent = spec.absent
    return section, unreadable


def build_report(*, results: list[str], samples: dict[str, str], classifier: str | None, dataset: str | None,
                 tre: dict[float, str], grid: int = 40) -> tuple[list[Section], dict[str, Any]]:
    found, unrecognised = discover(results)
    inputs = ReportInputs(samples=samples, classifier=classifier, dataset=dataset, tre=tre)
    sections = [samples_section(samples, grid)]
    for kind, spec in REPORT_SECTIONS.items():
        section, unreadable = build_section(spec, found[kind], inputs)
        sections.append(section)
        unrecognised += unreadable
        unread = {u["path"] for u in unreadable}
        found[kind] = [(p, o) for p, o in found[kind] if str(p) not in unread]
    described = {"results": results, "found": {k: [str(p) for p, _ in v] for k, v in found.items()},
                 "not_recognised": {"count": len(unrecognised), "first": unrecognised[:20]}, "samples": samples,
                 "classifier": classifier, "dataset": dataset, "tre": {str(k): v for k, v in tre.items()}}
    return sections, described


def render_html(sections: list[Section], inputs: dict[str, Any], title: str) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(title=title, sections=sections, inputs=json.dumps(inputs, indent=1, default=str),
                           not_recognised=inputs["not_recognised"], generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                           dumps=lambda o: json.dumps(o, indent=1, default=str))


def write_report(out: str | Path, *, results: list[str], samples: dict[str, str], classifier: str | None = None,
                 dataset: str | None = None, tre: dict[float, str] | None = None, grid: int = 40,
                 title: str = "tailforge evaluation report", lead: Sequence[Section] = ()) -> dict[str, Any]:
    """Write OUT/report.html and OUT/report.json; ``lead`` sections (e.g. the demo's findings) come first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, inputs = build_report(results=results, samples=samples, classifier=classifier, dataset=dataset,
                                    tre=tre or {}, grid=grid)
    sections = [*lead, *sections]
    report = {"title": title, "inputs": inputs, "sections": {s.key: s.to_json() for s in sections},
              "present": [s.key for s in sections if not s.absent], "absent": {s.key: s.absent for s in sections if s.absent}}
    page = render_html(sections, inputs, title)
    tmp = out / ".report.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "report.html")
    write_json_atomic(out / "report.json", report)
    return report
