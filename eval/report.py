"""`tailforge eval report`: every evaluation result in one report.json and one self-contained
report.html (figures embedded as PNG data URIs: it opens offline, from any folder).

Inputs are the JSON files the evaluation commands write (any file name works: each says its
"kind" and "version", :mod:`tailforge.eval.results`), shard sets for sample grids and density
histograms, and classifiers trained on reconstructed data for accuracy vs t_re. REPORT_SECTIONS
holds one section builder per result kind. A JSON of no known kind or version, or one its builder
cannot read, is listed as not recognised; a section whose inputs are absent is listed, with the
reason, among the sections not in the report; nothing is filled in.

What a reader sees: the lead sections (e.g. the demo's findings, with their intervals) first,
then per suite one comparison table (a row per classifier or shard set) and one figure, each with
the definition of its numbers next to it; example grids once; a note shared by several runs said
once; each run's own tables and figures folded away under "per-run details". Every figure keeps
the source file and the config that produced it (report.json, and folded in the page).
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

from tailforge.eval.config import EMM_STUDY_RUNS
from tailforge.eval.fidelity import DOMAINS as FAKE_DETECTION_DOMAINS
from tailforge.eval.figures import class_columns, data_uri, image_grid
from tailforge.eval.results import RESULT_VERSIONS
from tailforge.eval.stats import Interval, bootstrap, decode_bits, proportion_interval
from tailforge.gen.core.checks import field_comments  # a setting's comment is its --help text
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import read_json, write_json_atomic

TEMPLATE = Path(__file__).with_name("report_template.html")

#: result files of one kind: (path, parsed JSON)
Results = list[tuple[Path, dict[str, Any]]]

#: the one definition of "mean corruption accuracy" the report and the demo's summary print
#: (the corruptions result's own ``mean_corruption_accuracy``, eval/corruptions.py)
MEAN_CORRUPTION_ACCURACY = (
    "mean corruption accuracy: top-1 accuracy averaged over the CIFAR-10-C benchmark corruptions evaluated "
    "(Hendrycks & Dietterich 2019; those that change the images at this size) and their severities. Held-out "
    "corruptions (CIFAR-10-C's extra four, e.g. gaussian_blur) have their own columns and are not in the mean")


def mean_corruption_accuracy(result: dict[str, Any]) -> float | None:
    """A corruptions result's mean corruption accuracy (MEAN_CORRUPTION_ACCURACY); None when no
    benchmark corruption was evaluated."""
    return result["mean_corruption_accuracy"]


@dataclasses.dataclass
class Figure:
    title: str
    uri: str  # data URI of the PNG
    caption: str  # what it shows, the definition of its numbers, and where it came from
    config: dict[str, Any]  # the config that produced it
    folded: bool = False  # a per-run detail: shown under the section's folded "per-run details"


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""  # the definition of its numbers, stated under it
    folded: bool = False  # a per-run detail
    row_classes: list[str] = dataclasses.field(default_factory=list)  # a CSS class per row (e.g. a verdict)


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
    # what a figure was drawn from, for a later builder that adds to it (not in report.json)
    drawn: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        if self.absent:
            return {"title": self.title, "absent": self.absent}
        return {"title": self.title, "data": self.data, "notes": self.notes,
                "tables": [dataclasses.asdict(t) for t in self.tables],
                "figures": [{"title": f.title, "caption": f.caption, "config": f.config, "folded": f.folded}
                            for f in self.figures]}


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


#: histograms cut their x axis at this percentile of every set pooled: hardness has a tail two
#: orders of magnitude beyond its bulk, which a full axis squeezes into one or two bins
HISTOGRAM_CUT_PERCENTILE = 90.0


@_literal_text
def histogram_figure(panels: dict[str, dict[str, np.ndarray]], title: str) -> str:
    """One panel per metric (its x label -> set name -> values), each set a step histogram over
    the pooled 0.5th to HISTOGRAM_CUT_PERCENTILE-th percentile; the legend counts what lies beyond."""
    plt = _plt()
    _require(sum(len(v) for series in panels.values() for v in series.values()), title)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.0), squeeze=False, layout="constrained")
    for ax, (xlabel, series) in zip(axes[0], panels.items()):
        finite = {name: v[np.isfinite(v)] for name, v in series.items()}
        pooled = np.concatenate(list(finite.values()))
        low, cut = np.percentile(pooled, [0.5, HISTOGRAM_CUT_PERCENTILE])
        bins = np.linspace(low, cut, 30) if cut > low else 10
        for name, values in finite.items():
            beyond = int((values > cut).sum())
            ax.hist(values[values <= cut], bins=bins, histtype="step", linewidth=1.5,
                    weights=np.full(int((values <= cut).sum()), 1 / max(len(values), 1)),
                    label=f"{name}: median {np.median(values):.3g}, {beyond} of {len(values)} > cut")
        ax.set(xlabel=f"{xlabel} (cut at {cut:.3g})", ylabel="fraction of the set")
        # below the axes: inside, it hides the bars of the bulk
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(title, fontsize=9)
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
    """Grouped bars (a group per x label, a bar per series) with the legend outside the axes."""
    plt = _plt()
    _require(len(groups) * len(series), title)
    fig, ax = plt.subplots(figsize=(max(5.2, 0.3 * len(groups) * max(1, len(series))), 3.4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, values, width, label=name)
    for name, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _fig_uri(fig)


@_literal_text
def interval_figure(rows: dict[str, dict[str, Interval]], xlabel: str, title: str) -> str:
    """One line per row label, a point with its interval per series (e.g. plain and DiffAug-Ensemble)."""
    plt = _plt()
    _require(sum(len(v) for v in rows.values()), title)
    names = list(dict.fromkeys(s for v in rows.values() for s in v))
    fig, ax = plt.subplots(figsize=(6.2, 0.45 * len(rows) + 1.3))
    for j, name in enumerate(names):
        offset = (j - (len(names) - 1) / 2) * 0.22
        points = [(i, v[name]) for i, v in enumerate(rows.values()) if name in v]
        ax.errorbar([p.estimate for _, p in points], [i + offset for i, _ in points],
                    xerr=[[p.estimate - p.low for _, p in points], [p.high - p.estimate for _, p in points]],
                    fmt="o", capsize=3, label=name)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
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


@_literal_text
def labelled_grid_figure(panels: dict[str, np.ndarray], columns: Sequence[str], rows: Sequence[str], title: str) -> str:
    """Image grids (HxW or HxWx3 uint8, cells in equal columns and rows) side by side, three to a
    line, each column and row labelled: class names, corruption names, severities."""
    plt = _plt()
    _require(len(panels), title)
    per_line = min(3, len(panels))
    lines = -(-len(panels) // per_line)
    height, width = next(iter(panels.values())).shape[:2]
    inches = min(4.4, 0.42 * len(columns) + 0.6)
    fig, axes = plt.subplots(lines, per_line, figsize=(inches * per_line, inches * height / width * lines + 0.7),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, grid) in zip(axes.flat, panels.items()):
        ax.set_axis_on()
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks((np.arange(len(columns)) + 0.5) * grid.shape[1] / len(columns), columns, fontsize=7,
                      rotation=45 if max(map(len, columns)) > 3 else 0)
        ax.set_yticks((np.arange(len(rows)) + 0.5) * grid.shape[0] / len(rows), rows, fontsize=7)
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        ax.set_xlabel(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return _fig_uri(fig)


# --------------------------------------------------------------------------------------------
# Helpers


def _fmt(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    return "-" if value is None else value


def _with_interval(interval: Interval | None, value: Any = None, digits: int = 3) -> str:
    """An estimate and its 95 % interval as one cell; `value` alone where no per-item outcomes were kept."""
    if interval is None:
        return "-" if value is None else f"{value:.{digits}f}"
    return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def _proportion(bits: Any) -> Interval | None:
    """The exact interval of a rate from a result's per-item 0/1 string, None when it kept none."""
    return proportion_interval(decode_bits(bits)) if isinstance(bits, str) and bits else None


def _said_once(section: Section, what: str, per_run: dict[str, str]) -> None:
    """One note per distinct text: runs that share a note (the same corruptions not computed for
    every classifier) are named together instead of repeating it."""
    by_text: dict[str, list[str]] = {}
    for run, text in per_run.items():
        if text:
            by_text.setdefault(text, []).append(run)
    for text, runs in by_text.items():
        who = "every run" if len(runs) == len(per_run) and len(runs) > 1 else ", ".join(runs)
        section.notes.append(f"{what} ({who}): {text}")


def _sources_table(labels: dict[str, Path]) -> Table:
    return Table("result files", ["run", "file"], [[label, str(path)] for label, path in labels.items()], folded=True)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _embedded_bytes(section: Section, result: Path, name: Any) -> bytes | None:
    """The PNG that a result file names (relative to its own folder), or None when it names none
    or the file is absent. Only a PNG inside the result's folder is read: a name that is
    absolute, holds '..' or resolves (through a symlink) outside the folder, or a file that is not
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
    return data


def _embedded_png(section: Section, result: Path, name: Any) -> str | None:
    """The data URI of _embedded_bytes's PNG."""
    data = _embedded_bytes(section, result, name)
    return data_uri(data) if data else None


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
    """One figure of every shard set: about `grid` samples each, the first of each class by global
    index in a column headed by the class name. Sets generated with the same job seed start from
    the same noise, so their panels are paired cell by cell."""
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.data.shards.format import JOB_FILE

    section = Section("samples", "Samples (same seeds, same positions)")
    if not samples:
        section.absent = "no --samples NAME=SHARDS given"
        return section
    seeds, panels, configs, class_names = {}, {}, {}, None
    for name, root in samples.items():
        data = load_dataset(f"shards:{root}", "train")
        class_names = class_names or list(data.info.class_names)
        order = sorted(range(len(data)), key=lambda i: data.keys[i])
        per_class = max(1, grid // len(class_names))
        cells = class_columns([int(data.labels[i]) for i in order], len(class_names), per_class)
        blank = torch.full_like(data.images[:1], 255)
        images = torch.cat([data.images[order[c]][None] if c is not None else blank for c in cells])
        panels[name] = np.asarray(image_grid(images, len(class_names)))
        job = read_json(Path(root) / JOB_FILE, "job file") if (Path(root) / JOB_FILE).is_file() else {}
        seeds[name] = job.get("seed")
        configs[name] = {"shards": root, **{k: v for k, v in job.items() if not isinstance(v, (dict, list))},
                         **{k: v for k, v in (job.get("sampling") or {}).items()}}
    rows = [str(r + 1) for r in range(max(1, grid // len(class_names)))]
    uri = labelled_grid_figure(panels, class_names, rows, "samples by class (columns: class names; rows: first, "
                                                          "second, ... of that class by index)")
    section.figures.append(Figure(
        "samples", uri, "one panel per shard set: in each column the first samples of that class in index order "
        "(an empty cell: the set has fewer of that class). Sample i of sets from the same job seed starts from the "
        "same noise, so the same cell of two such panels compares the same seed.", configs))
    if len(set(seeds.values())) > 1:
        section.notes.append(f"the sets were generated with different job seeds {seeds}: the grids are not paired")
    section.data = {"sets": samples, "seeds": seeds}
    return section


#: the density metrics (Sehwag et al. 2022 Sec. 4.2): per-sample key, axis label
DENSITY_METRICS = (("hardness", "hardness (Eq. 3)"), ("avg_knn", "AvgkNN"), ("lof", "LOF"))

DENSITY_DEFINITION = (
    "Each set embedded by the independent evaluation classifier and compared with the real training split: "
    "hardness (Sehwag et al. 2022 Eq. 3, the class-conditional Gaussian negative log-likelihood), AvgkNN (mean "
    "distance to the k nearest real neighbours) and LOF (local outlier factor); higher = lower density. Precision: "
    "fraction of the set inside the real k-NN manifold; recall: fraction of the real split inside the set's; "
    "class agreement: fraction the evaluation classifier assigns to the sample's label. Intervals (95 %): "
    "bootstrap of the median over samples, exact binomial for fractions.")


def _median(values: np.ndarray) -> np.ndarray:
    return np.median(values, axis=-1)


def _density_row(name: str, part: dict[str, Any]) -> list[Any]:
    per_sample = part.get("per_sample") or {}
    cells = []
    for metric, _ in DENSITY_METRICS:
        values = per_sample.get(metric)
        interval = bootstrap(np.asarray(values, dtype=np.float64), statistic=_median) if values else None
        cells.append(_with_interval(interval, (part.get(metric) or {}).get("median")))
    return [name, part.get("num", len(per_sample.get("hardness") or []) or "-"), *cells,
            _with_interval(_proportion(per_sample.get("inside_real_manifold")), part.get("precision")),
            _with_interval(None, part.get("recall")),
            _with_interval(_proportion(per_sample.get("faithful")), part.get("accuracy"))]


def density_section(section: Section, results: Results) -> None:
    rows, sources, values, references = [], {}, {}, []
    for path, obj in results:
        name = Path(str(obj.get("shards") or path.stem)).name
        sources[name] = path
        rows.append(_density_row(name, obj["samples"]))
        values[name] = obj["samples"].get("per_sample") or {}
        if obj["real_test"] not in references:  # results against the same real split share one row
            references.append(obj["real_test"])
        section.data[str(path)] = {k: {m: v for m, v in obj[k].items() if m != "per_sample"}
                                   for k in ("samples", "real_test")}
    for i, real in enumerate(references):
        rows.append(_density_row("real test" + (f" ({i + 1})" if len(references) > 1 else ""), real))
    values["real test"] = references[0].get("per_sample") or {}
    section.tables.append(Table("density of each set", ["set", "n", "median hardness", "median AvgkNN", "median LOF",
                                                        "precision", "recall", "class agreement"], rows,
                                note=DENSITY_DEFINITION))
    section.tables.append(_sources_table(sources))
    section.drawn["histograms"] = {name: {m: np.asarray(v[m], dtype=np.float64) for m, _ in DENSITY_METRICS}
                                   for name, v in values.items() if all(v.get(m) for m, _ in DENSITY_METRICS)}
    section.drawn["shards"] = {str(obj.get("shards")) for _, obj in results}
    _density_figure(section, {"results": {name: str(p) for name, p in sources.items()}})


def _density_figure(section: Section, config: dict[str, Any]) -> None:
    values = section.drawn.get("histograms") or {}
    if not values:
        return
    uri = histogram_figure({label: {n: v[m] for n, v in values.items()} for m, label in DENSITY_METRICS},
                           "hardness, AvgkNN and LOF of each set")
    section.figures[:] = [f for f in section.figures if f.title != "density histograms"]
    section.figures.insert(0, Figure(
        "density histograms", uri, f"each set's distribution (fraction of the set per bin). The x axis is cut at the "
        f"{HISTOGRAM_CUT_PERCENTILE:g}th percentile of every set pooled, so the bulk is readable: the long tail "
        "beyond it (where low-density samples lie) is counted in the legend as '> cut'. "
        + DENSITY_DEFINITION.split(". Precision")[0] + ".", config))
    section.data["medians"] = {m: {n: float(np.median(v[m])) for n, v in values.items()} for m, _ in DENSITY_METRICS}


def density_histograms(section: Section, inputs: ReportInputs) -> None:
    """Hardness, AvgkNN and LOF of the --samples sets that no density result covers, drawn with
    those of the results (computed here with --classifier against --dataset)."""
    from tailforge.eval import density
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import embed, load_classifier

    covered = section.drawn.get("shards", set())
    samples = {name: root for name, root in inputs.samples.items() if root not in covered}
    classifier, dataset = inputs.classifier, inputs.dataset
    if not samples:
        return
    if not (classifier and dataset):
        section.notes.append("histograms of sets without a density result need --classifier (an evaluation "
                             "classifier) and --dataset")
        return
    net, _ = load_classifier(classifier)
    config = density.DensityConfig()
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    reference = density.real_reference(embed(net, train.images), train.labels, train.info.num_classes, config)
    values = section.drawn.setdefault("histograms", {})
    for name, root in samples.items():
        density.check_independent(classifier, density.read_shard_set(root)[2])
        data = load_dataset(f"shards:{root}", "train")
        values[name] = {k: v.numpy() for k, v in density.density_metrics(embed(net, data.images), data.labels,
                                                                           reference, config).items()}
    if "real test" not in values:
        values["real test"] = {k: v.numpy() for k, v in density.density_metrics(
            embed(net, test.images), test.labels, reference, config).items()}
    _density_figure(section, {"classifier": classifier, "dataset": dataset, **dataclasses.asdict(config),
                              "sets": inputs.samples})


ACCURACY_DEFINITION = ("top-1: fraction of the test split classified correctly, with its exact 95 % binomial "
                       "interval (Clopper-Pearson) over the n test images; ECE: expected calibration error. "
                       "DiffAug-Ensemble (Sastry et al. 2023): the classifier's prediction averaged over "
                       "diffusion-denoised copies of each test image.")


def accuracy_section(section: Section, results: Results) -> None:
    rows, points, sources = [], {}, {}
    ensemble = any("diffaug_ensemble" in obj for _, obj in results)
    for path, obj in results:
        label = _run_label(obj.get("config") or obj) or str(path)
        sources[label] = path
        plain = _proportion(obj.get("correct"))
        de = obj.get("diffaug_ensemble") or {}
        de_interval = _proportion(de.get("correct"))
        row = [label, obj.get("n"), _with_interval(plain, obj["top1"]), _fmt(obj.get("ece"), 3)]
        if ensemble:
            row += [_with_interval(de_interval, de.get("top1")), _fmt(de.get("ece"), 3)]
        rows.append(row)
        points[label] = {"plain": plain or Interval(obj["top1"], obj["top1"], obj["top1"], 0.95, "none", 0, 1)}
        if de:
            points[label]["DiffAug-Ensemble"] = de_interval or Interval(de["top1"], de["top1"], de["top1"], 0.95,
                                                                        "none", 0, 1)
    header = ["classifier", "n", "top-1 [95 % interval]", "ECE"]
    header += ["DiffAug-Ensemble top-1 [95 % interval]", "DiffAug-Ensemble ECE"] if ensemble else []
    section.tables.append(Table("test accuracy of each classifier", header, rows, note=ACCURACY_DEFINITION))
    section.tables.append(_sources_table(sources))
    section.figures.append(Figure("test accuracy", interval_figure(points, "test top-1 accuracy", "test accuracy"),
                                  "each classifier's top-1 with its 95 % interval (no bar: the result kept no "
                                  "per-image outcomes). " + ACCURACY_DEFINITION,
                                  {label: str(p) for label, p in sources.items()}))
    section.data["accuracy"] = {str(p): {k: v for k, v in o.items() if k != "correct"} for p, o in results}


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


def _corruption_interval(obj: dict[str, Any]) -> Interval | None:
    """The 95 % bootstrap interval of the mean corruption accuracy over test images: each image's
    accuracy over the (benchmark corruption, severity) cells in the mean, resampled by image."""
    cells = [c.get("correct") for name in obj["included_in_mean"] for c in obj["corruptions"][name]["severities"]]
    if not cells or not all(isinstance(c, str) and c for c in cells):
        return None
    return bootstrap(np.mean([decode_bits(c) for c in cells], axis=0))


def _corruption_examples(section: Section, results: Results, labels: dict[str, str],
                         configs: dict[str, Any]) -> None:
    """The examples grid once per distinct image (every classifier of a suite corrupts the same test
    images), its rows and columns labelled."""
    shown: dict[bytes, list[str]] = {}
    meta = {}
    for path, obj in results:
        data = _embedded_bytes(section, path, obj.get("examples_png"))
        if data:
            shown.setdefault(data, []).append(labels[str(path)])
            meta.setdefault(data, obj)
    from PIL import Image

    for data, runs in shown.items():
        obj = meta[data]
        grid = np.asarray(Image.open(io.BytesIO(data)))
        columns = ["clean"] + [f"severity {s}" for s in obj.get("severities", [])]
        uri = labelled_grid_figure({"one test image per row": grid}, columns, obj.get("example_rows", []),
                                   "corrupted examples")
        who = "every classifier" if len(runs) == len(results) else ", ".join(runs)
        section.figures.append(Figure("corrupted examples", uri, f"the same test image under each corruption "
                                      f"(rows) and severity (columns); the images {who} was evaluated on",
                                      configs[runs[0]]))


def corruption_section(section: Section, results: Results) -> None:
    labels = {str(p): _run_label(o.get("config")) or str(p) for p, o in results}
    names = list(dict.fromkeys(n for _, o in results for n in o["corruptions"]))
    first = {n: next(o["corruptions"][n] for _, o in results if n in o["corruptions"]) for n in names}

    def heading(name: str) -> str:
        row = first[name]
        return name + ("" if row.get("benchmark", True) else " (held out)") + \
            ("" if row.get("effective", True) else " (no effect)")

    series = {labels[str(p)]: [o["corruptions"].get(n, {}).get("mean_accuracy", np.nan) for n in names] for p, o in results}
    configs = {labels[str(p)]: {**(o.get("config") or {}), "reference_size": o.get("reference_size"),
                                "severities": o.get("severities"), "source": str(p)} for p, o in results}
    rows = []
    for path, obj in results:
        rows.append([labels[str(path)], _fmt(obj["clean_accuracy"], 3),
                     _with_interval(_corruption_interval(obj), mean_corruption_accuracy(obj))]
                    + [_fmt(obj["corruptions"].get(n, {}).get("mean_accuracy"), 3) for n in names])
    severities = results[0][1].get("severities") or [c["severity"] for c in first[names[0]]["severities"]]
    section.tables.append(Table(
        "accuracy under corruptions", ["classifier", "clean top-1", "mean corruption accuracy [95 % interval]"]
        + [heading(n) for n in names], rows,
        note=f"{MEAN_CORRUPTION_ACCURACY}. Interval: 95 % bootstrap over test images. Each corruption's column: its "
             f"accuracy averaged over severities {', '.join(map(str, severities))}."))
    section.figures.append(Figure("accuracy per corruption", bar_figure(
        [heading(n) for n in names], series, "accuracy (mean over severities)", "accuracy per corruption"),
        "each classifier's accuracy under each corruption, averaged over its severities; the table above gives "
        "the clean accuracy and the " + MEAN_CORRUPTION_ACCURACY, configs))
    _corruption_examples(section, results, labels, configs)
    sev = {labels[str(p)]: ([int(s) for s in o["per_severity"]], list(o["per_severity"].values()))
           for p, o in results if o.get("per_severity")}
    if sev:
        section.figures.append(Figure("accuracy vs severity", line_figure(
            sev, "severity", "mean accuracy over corruptions", "accuracy vs severity", ylim=(0, 1.02)),
            "accuracy averaged over the benchmark corruptions in the mean, per severity", configs, folded=True))
    not_computed, no_effect = {}, {}
    for path, obj in results:
        label = labels[str(path)]
        section.tables.append(Table(
            f"{label}: clean {obj['clean_accuracy']:.4f}, mean corruption accuracy "
            f"{_fmt(mean_corruption_accuracy(obj))}",
            ["corruption", "family", "in mean"] + [f"sev {c['severity']}" for c in next(iter(obj["corruptions"].values()))["severities"]]
            + ["unchanged at sev 5"],
            [[n, r["family"], "yes" if n in obj["included_in_mean"] else "no"] + [_fmt(c["accuracy"], 3) for c in r["severities"]]
             + [_fmt(r["severities"][-1]["unchanged_fraction"], 2)] for n, r in obj["corruptions"].items()],
            note="families: " + ", ".join(f"{f} {_fmt(v, 3)}" for f, v in obj["families"].items()), folded=True))
        not_computed[label] = "; ".join(f"{k} ({v})" for k, v in (obj.get("not_computed") or {}).items())
        no_effect[label] = ", ".join(obj.get("no_effect_at_this_size") or [])
        section.data[str(path)] = {k: obj[k] for k in ("clean_accuracy", "mean_corruption_accuracy", "families",
                                                       "per_severity", "included_in_mean")}
    _said_once(section, "not computed", not_computed)
    _said_once(section, "no effect at this image size, left out of the means", no_effect)


def _run_label(config: dict[str, Any] | None) -> str:
    config = config or {}
    label = Path(str(config.get("classifier") or "")).name or str(config.get("model") or "")
    if config.get("diffaug_ensemble"):
        label += " + DiffAug-Ensemble"
    return label


OOD_DEFINITION = ("AUROC: probability that an in-distribution test image scores above an OOD image (1 = perfect "
                  "separation, 0.5 = chance), averaged over the OOD sets; FPR@95 (per-run details): the fraction "
                  "of OOD images kept when 95 % of ID images are (ID-positive), and the fraction of ID images "
                  "flagged when 95 % of OOD images are (OOD-positive, OpenOOD v1.5). Intervals of the differences "
                  "the papers claim are in the findings.")


def ood_section(section: Section, results: Results) -> None:
    labels = {str(p): _run_label(o.get("config")) or str(p) for p, o in results}
    scores = list(dict.fromkeys(s for _, o in results for s in o["scores_computed"]))
    sets = list(dict.fromkeys(f"{n} ({r.get('kind', '')}, n={r.get('num', '-')})" for _, o in results
                              for n, r in o["sets"].items()))
    rows, series, not_applicable = [], {}, {}
    for path, obj in results:
        label = labels[str(path)]
        means = {s: (obj["mean_over_sets"].get(s) or {}).get("auroc") for s in scores}
        rows.append([label, obj.get("num_id", "-")] + [_fmt(means[s], 3) for s in scores])
        series[label] = [np.nan if means[s] is None else means[s] for s in scores]
        config = {**(obj.get("config") or {}), "source": str(path)}
        section.figures.append(Figure(f"ROC {label}", roc_figure(obj["sets"], f"ROC curves: {label}"),
                                      "one panel per OOD set; legend: score and AUROC", config, folded=True))
        # FPR@95 in both conventions: ID positive (the classic figure) and OOD positive (OpenOOD v1.5)
        computed = obj["scores_computed"]
        section.tables.append(Table(f"{label}: AUROC / FPR@95 ID-positive / FPR@95 OOD-positive",
                                    ["OOD set", "kind"] + computed,
                                    [[name, r.get("kind", "")] + [
                                        f"{r['scores'][s]['auroc']:.3f} / {r['scores'][s]['fpr95']:.3f} / "
                                        f"{r['scores'][s]['fpr95_ood_positive']:.3f}" for s in computed]
                                     for name, r in obj["sets"].items()], folded=True))
        not_applicable[label] = "; ".join(f"{k} ({v})" for k, v in (obj.get("scores_not_applicable") or {}).items())
        section.data[str(path)] = {"mean_over_sets": obj["mean_over_sets"],
                                   "auroc": {n: {s: v["auroc"] for s, v in r["scores"].items()} for n, r in obj["sets"].items()}}
    section.tables.insert(0, Table("OOD detection: AUROC averaged over the OOD sets", ["classifier", "ID test images"]
                                   + scores, rows, note=f"OOD sets: {', '.join(sets)}. {OOD_DEFINITION}"))
    section.figures.insert(0, Figure("AUROC per score", bar_figure(scores, series, "AUROC (mean over OOD sets)",
                                                                   "OOD detection per score"),
                                     f"each classifier's AUROC per OOD score, averaged over {len(sets)} OOD sets. "
                                     + OOD_DEFINITION, {label: str(p) for p, label in
                                                        ((p, labels[str(p)]) for p, _ in results)}))
    _said_once(section, "not applicable", not_applicable)


def fidelity_section(section: Section, results: Results) -> None:
    rows = []
    for path, obj in results:
        cfg = obj.get("config") or {}
        detection = obj["fake_detection"]
        rows.append([cfg.get("shards") or str(path), cfg.get("classifier"), _fmt(obj["frechet_distance"], 3),
                     _fmt(obj.get("frechet_distance_real_test_vs_train"), 3)]
                    + [f"{d['accuracy']:.3f}" + (f" ± {d['std']:.3f}" if d.get("std") is not None else "")
                       for d in (detection["pixel"], detection["dct"])])
        section.data[str(path)] = {k: obj[k] for k in ("frechet_distance", "fake_detection")}
    section.tables.append(Table("fidelity", ["shards", "feature classifier", "Frechet distance", "FD real test vs train",
                                             "fake detection (pixel)", "fake detection (DCT)"], rows,
                                note="Frechet distance between the set's and the real training split's features in "
                                     "the evaluation classifier (FD of the real test split against the training "
                                     "split: the floor); fake detection: cross-validated accuracy ± its standard "
                                     "deviation over folds of a linear real-vs-synthetic detector on pixels or on "
                                     "DCT coefficients (Yamaguchi & Fukuda 2023 Sec. 4.1); 0.5 means "
                                     "indistinguishable"))


MEMORIZATION_DEFINITION = ("memorization ratio: fraction of generated samples whose nearest training image (L2, "
                           "pixel space) is closer than a third of the second nearest, d1 < d2 / 3 (Yoon et al. 2023 "
                           "Sec. 3.1; Gu et al. 2023), with its exact 95 % binomial interval")


def memorization_section(section: Section, results: Results) -> None:
    rows = []
    hist = {}
    for path, obj in results:
        cfg = {**(obj.get("config") or {}), "source": str(path)}
        label = cfg.get("shards") or cfg.get("samples") or str(path)
        ratio = _with_interval(_proportion(obj.get("replicate")), obj["memorization_ratio"])
        rows.append([label, obj.get("config", {}).get("dataset"), obj["num_generated"], obj["num_train"], ratio,
                     obj["distinct_train_images_replicated"], _fmt(obj["median_ratio_d1_d2"], 3),
                     _fmt((obj.get("feature_space") or {}).get("generated_over_heldout_mean"), 3)])
        hist[label] = obj["ratio_histogram"]
        grid = _embedded_png(section, path, obj.get("nearest_pairs_png"))
        if grid:
            section.figures.append(Figure(f"closest pairs {label}", grid, "the generated images closest to the training "
                                          "set (top of each pair) above their nearest training image", cfg))
        if obj.get("per_class"):
            section.tables.append(Table(f"{label}: per class", ["class", "generated", "training images",
                                                                "memorization ratio", "distinct replicated"],
                                        [[c["name"], c["generated"], c["train_images"], _fmt(c["memorization_ratio"]),
                                          c["distinct_train_images_replicated"]] for c in obj["per_class"]],
                                        folded=True))
        section.data[str(path)] = {k: obj.get(k) for k in ("memorization_ratio", "distinct_train_images_replicated",
                                                          "median_ratio_d1_d2", "feature_space")}
    section.tables.insert(0, Table("memorization", ["samples", "training data", "generated", "training images",
                                                    "memorization ratio [95 % interval]",
                                                    "distinct training images replicated", "median d1/d2",
                                                    "feature NN distance generated / held-out"], rows,
                                   note=MEMORIZATION_DEFINITION + "; feature NN distance: mean nearest-neighbour "
                                   "distance in the evaluation classifier's features of generated samples over that "
                                   "of held-out real images (1 = as close as unseen real images)"))
    series = {}
    for label, h in hist.items():
        centres = (np.array(h["edges"][:-1]) + np.array(h["edges"][1:])) / 2
        counts = np.array(h["counts"], dtype=float)
        series[label] = (centres.tolist(), (counts / max(counts.sum(), 1)).tolist())
    section.figures.insert(0, Figure("d1/d2 distribution", line_figure(
        series, "d1 / d2 (nearest / second-nearest training distance)", "fraction of samples",
        "distribution of d1/d2; replicates left of 1/3"), "each sample's d1/d2; " + MEMORIZATION_DEFINITION,
        {label: str(p) for (p, _), label in zip(results, hist)}))


def _emm_folder(path: Path) -> str:
    """An emm.json's folder as the report names it: OUT, or SEED/RUN inside an EMM study."""
    return f"{path.parent.parent.name}/{path.parent.name}" if path.parent.name in EMM_STUDY_RUNS else path.parent.name


def emm_section(section: Section, results: Results) -> None:
    series, markers, configs, rows = {}, {}, {}, []
    for path, obj in results:
        cfg = obj["config"]
        budget = f"{cfg['epochs']} epochs" if cfg.get("budget") == "epochs" else f"{cfg['steps']} steps"
        label = f"labels={cfg['labels']}" + (f", +{cfg['dummy']} GM dummies" if cfg.get("dummy") else "") + \
                (f", classes {','.join(cfg['class_counts'])}" if cfg.get("class_counts") else "") + \
                f", {budget} ({_emm_folder(path)})"
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
                                              "nearest training image", {**cfg, "size": p["size"]}, folded=True))
    threshold = 1 - results[0][1]["config"]["epsilon"]
    section.figures.insert(0, Figure("memorization ratio vs size", line_figure(
        series, "training-set size N (log)", "memorization ratio", "memorization ratio vs training-set size",
        logx=True, hline=(threshold, f"1 - eps = {threshold:g}"), markers=markers, ylim=(-0.02, 1.02)),
        "each point: one model trained on a nested subset, its memorization ratio (d1 < d2 / 3) over its generated "
        "samples; EMM (Gu et al. 2023 Def. 1): the largest N whose ratio stays above 1 - eps, interpolated between "
        "the bracketing sizes", configs))
    section.tables.append(Table("points", ["study", "N", "memorization ratio", "distinct replicated", "median d1/d2"],
                                rows))


def entropy_section(section: Section, results: Results) -> None:
    rows = []
    for path, obj in results:
        for spec, r in obj["datasets"].items():
            rows.append([str(path), obj.get("classifier"), spec, r["n"], _fmt(r["mean_entropy"]),
                         _fmt(r.get("max_entropy")), _fmt(r.get("top1"))])
        section.data[str(path)] = {k: obj.get(k) for k in ("classifier", "split", "datasets")}
    section.tables.append(Table("mean output entropy (nats)", ["source", "classifier", "dataset", "n", "mean entropy",
                                                               "maximum (log C)", "top-1"], rows,
                                note="mean over images of the entropy of the classifier's softmax output "
                                     "(Yamaguchi & Fukuda 2023 Eq. 4); lower: samples the classifier finds easier, "
                                     "closer to the modes of the real data"))


# --------------------------------------------------------------------------------------------
# Lead and closing sections that are not built from result files


#: the verdict rule (eval/stats.py verdict) in words, the end of every findings table's note
VERDICT_DECISION = ("a finding is reproduced when the whole interval lies on the paper's side of its threshold, "
                    "contradicted when it lies on the other side, inconclusive otherwise.")
VERDICT_RULE = ("Each interval is a 95 % paired bootstrap over the items both sides were measured on (test images, "
                "corrupted test images, or generated samples that share their seeds; exact binomial for a rate "
                "against a threshold); " + VERDICT_DECISION)


def _interval_cell(interval: dict[str, Any], digits: int = 3) -> str:
    """An estimate and its interval as one cell, from a result file's interval dict."""
    return f"{interval['estimate']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def reconstruction_section(section: Section, results: Results) -> None:
    """Yamaguchi & Fukuda 2023's measurements against t_re (tailforge eval reconstruction)."""
    for path, obj in results:
        cfg = {**obj["config"], "source": str(path)}
        label = f"{Path(cfg['classifier']).name} features, reference {obj['reference']['dataset']} " \
                f"{obj['reference']['split']} ({obj['reference']['num_images']} images)"
        rows = []
        for p in obj["points"]:
            detection = p["fake_detection"]
            rows.append([f"{p['t_re']:g}", p["label"], p["num_samples"], _interval_cell(p["frechet_distance"]),
                         _interval_cell(p["precision"]), _interval_cell(p["recall"]), p["precision_recall_items"]]
                        + [_interval_cell(detection[d][m]["interval"]) for d in FAKE_DETECTION_DOMAINS for m in ("logistic_regression", "cnn")]
                        + [detection["pixel"]["cnn"]["test_items"]])
        section.tables.append(Table(f"{label}: estimate [95 % interval]", [
            "t_re", "set", "samples", "Frechet distance", "precision", "recall", "P/R items per side",
            "linear pixel", "CNN pixel", "linear DCT", "CNN DCT", "CNN test items"], rows))
        for name, caption in ((obj.get("metrics_png"), "FD (bias-shifted bootstrap), precision/recall and "
                               "fake-detection accuracy (exact intervals) against t_re"),
                              ((obj.get("pca") or {}).get("png"), "features projected on the real reference's top "
                               "two principal components, one panel per t_re (Yamaguchi & Fukuda 2023 Fig. 1b)")):
            uri = _embedded_png(section, path, name)
            if uri:
                section.figures.append(Figure(f"{name} ({label})", uri, caption, cfg))
        section.data[str(path)] = {"reference": obj["reference"], "points": [
            {k: p[k] for k in ("t_re", "num_samples", "frechet_distance", "precision", "recall")} |
            {"fake_detection": {d: {m: p["fake_detection"][d][m]["interval"] for m in ("logistic_regression", "cnn")}
                                for d in FAKE_DETECTION_DOMAINS}} for p in obj["points"]]}
    section.notes.append("fake detection: 0.5 means the detector cannot tell the set from real images; t_re = 0 is "
                         "the real split the sets were reconstructed from. Precision/recall intervals treat the "
                         "manifold memberships as independent, which they are not: they are optimistic.")


def findings_section(rows: list[dict[str, Any]], where: str, rule: str = VERDICT_RULE) -> Section:
    """The papers' findings a run checked (eval.findings.decide's rows), one row each with its
    interval and verdict; `where` says what they rest on (e.g. "digits, one training seed"), `rule`
    how the intervals were made (a study's are t-intervals across seeds)."""
    section = Section("findings", "Findings of the papers this run checks")
    add_findings(section, rows, where, rule)
    return section


def add_findings(section: Section, rows: list[dict[str, Any]], where: str, rule: str) -> None:
    """The findings table (one row per finding: interval, items x seeds, verdict) and its count of verdicts."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("reproduced", "contradicted", "inconclusive")}
    section.notes.append(f"{counts['reproduced']} reproduced, {counts['contradicted']} contradicted, "
                         f"{counts['inconclusive']} inconclusive of {len(rows)} findings on {where}.")
    section.tables.append(Table("findings", ["paper", "finding", "d: what is compared", "d, 95 % interval",
                                             "items x seeds", "verdict"],
                                [[r["paper"], r["finding"], r["difference"],
                                  f"{r['estimate']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]",
                                  f"{r['items']} x {r['seeds']}", r["verdict"]] for r in rows],
                                note=rule, row_classes=[r["verdict"] for r in rows]))
    section.data["findings"] = rows


#: how an EMM study's intervals are made (tailforge.eval.emm_study)
EMM_STUDY_RULE = ("Each seed's interval is a 95 % two-sample bootstrap over the generated samples of the two runs "
                  "compared (each ratio at its highest training snapshot); across seeds, the Student-t interval of "
                  "the seeds' differences with their bootstrap half-width added in quadrature; " + VERDICT_DECISION)


def emm_study_section(section: Section, results: Results) -> None:
    """tailforge eval emm-study: its findings across seeds, the highest ratio of every run and EMM."""
    for path, obj in results:
        cfg = obj["config"]
        add_findings(section, obj["findings"], f"{cfg['dataset']}, {cfg['seeds']} seeds, {cfg['epochs']} epochs "
                     f"for every run ({path})", EMM_STUDY_RULE)
        section.tables.append(Table(f"highest memorization ratio per run ({path.parent.name})",
                                    ["run", "training images", "epochs", "mean over seeds [95 % t-interval]",
                                     "per seed"],
                                    [[name, r["num_train"], r["epochs"], _interval_cell(r["interval"]),
                                      ", ".join(f"{v:.3f}" for v in r["per_seed"])] for name, r in obj["ratios"].items()]))
        emm = obj["emm"]
        section.notes.append(f"EMM at epsilon = {cfg['epsilon']:g} per seed: "
                             f"{', '.join('-' if v is None else f'{v:.1f}' for v in emm['per_seed'])}"
                             + (f"; mean {_interval_cell(emm['interval'], 1)} (t over seeds)" if emm.get("interval")
                                else f" ({emm.get('note')})"))
        section.data[str(path)] = {k: obj[k] for k in ("config", "findings", "ratios", "emm")}


def _flat_settings(config: Any, prefix: str = "") -> list[list[Any]]:
    comments = field_comments(type(config))
    rows = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            rows += _flat_settings(value, f"{prefix}{field.name}.")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            rows.append([prefix + field.name, "-" if shown is None else str(shown), comments.get(field.name, "")])
    return rows


def settings_section(config: Any, title: str = "Settings of this run") -> Section:
    """A config dataclass as a table: every setting (nested configs as dotted names), its value,
    and what it sets (the field's comment, which is also its CLI help)."""
    from tailforge.gen.core.files import config_dict

    section = Section("settings", title)
    section.tables.append(Table("settings", ["setting", "value", "what it sets"], _flat_settings(config)))
    section.data["config"] = config_dict(config)
    return section


# --------------------------------------------------------------------------------------------
# The registry and the report


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    """The report section of one kind of result."""

    kind: str  # the result kind it reads (tailforge.eval.results.RESULT_VERSIONS)
    title: str  # its heading
    # adds to the section, for the results (at least one): one comparison table (a row per run) with the
    # definition of its numbers as the table's note, one figure, and per-run tables and figures folded
    build: Callable[[Section, Results], None]
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
    SectionSpec("emm_study", "Memorization findings over several seeds (Gu et al. 2023; Yoon et al. 2023)",
                emm_study_section, "no EMM study results (tailforge eval emm-study)"),
    SectionSpec("reconstruction", "Reconstructed data vs t_re: Frechet distance, precision/recall, fake detection, PCA "
                "(Yamaguchi & Fukuda 2023)", reconstruction_section,
                "no reconstruction results (tailforge eval reconstruction)"),
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
    return template.render(title=title, sections=[s for s in sections if not s.absent],
                           absent=[s for s in sections if s.absent], inputs=json.dumps(inputs, indent=1, default=str),
                           not_recognised=inputs["not_recognised"], generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                           dumps=lambda o: json.dumps(o, indent=1, default=str))


def write_report(out: str | Path, *, results: list[str], samples: dict[str, str], classifier: str | None = None,
                 dataset: str | None = None, tre: dict[float, str] | None = None, grid: int = 40,
                 title: str = "tailforge evaluation report", lead: Sequence[Section] = (),
                 settings: Any = None) -> dict[str, Any]:
    """Write OUT/report.html and OUT/report.json; ``lead`` sections (e.g. the demo's findings) come
    first, the ``settings`` of the run (a config dataclass) as a table last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, inputs = build_report(results=results, samples=samples, classifier=classifier, dataset=dataset,
                                    tre=tre or {}, grid=grid)
    sections = [*lead, *sections, *([settings_section(settings)] if settings is not None else [])]
    report = {"title": title, "inputs": inputs, "sections": {s.key: s.to_json() for s in sections},
              "present": [s.key for s in sections if not s.absent], "absent": {s.key: s.absent for s in sections if s.absent}}
    page = render_html(sections, inputs, title)
    tmp = out / ".report.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "report.html")
    write_json_atomic(out / "report.json", report)
    return report
