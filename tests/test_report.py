"""The report gathers real (small) evaluation outputs, embeds every figure, and renders offline."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from tailforge.cli import main
from tailforge.eval.config import CorruptionSuiteConfig
from tailforge.eval.emm import estimate_emm, write_labeled_shards
from tailforge.eval.fidelity import fidelity_report
from tailforge.eval.figures import class_columns
from tailforge.eval.report import (
    MEAN_CORRUPTION_ACCURACY,
    _corruption_interval,
    findings_section,
    mean_corruption_accuracy,
    write_report,
)
from tailforge.eval.results import tag_result
from tailforge.gen.core.files import write_json_atomic
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.models.classifiers import create_classifier, load_classifier, save_classifier
from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
from tailforge.gen.models.unet import build_unet

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"headless Chromium not installed at {CHROMIUM} "
                                    "(the report's HTML structure is checked without it)")

#: appended to a copy of a report: writes every section's, image's and text block's box (page
#: coordinates, after layout) into the DOM, where --dump-dom returns it
MEASURE_SCRIPT = """<script>
addEventListener("load", function () {
  if (OPEN_DETAILS) document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  var boxes = [];
  document.querySelectorAll("section[id], img, figcaption, p, caption, table, h1, h2, h3, summary, li").forEach(
    function (el) {
      var r = el.getBoundingClientRect(), section = el.closest("section[id]");
      boxes.push([el.tagName.toLowerCase(), section ? section.id : "", r.left + scrollX, r.top + scrollY,
                  r.width, r.height]);
    });
  var pre = document.createElement("pre");
  pre.id = "layout-boxes";
  pre.textContent = JSON.stringify({height: document.documentElement.scrollHeight, boxes: boxes});
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                           "--force-device-scale-factor=1", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           *args], capture_output=True, text=True, timeout=120)


def page_layout(page: Path, work: Path, width: int = 1280, open_details: bool = False) -> dict:
    """{"height": page height, "boxes": [[tag, section id, left, top, width, height], ...]} of `page`
    laid out by headless Chromium in a window `width` px wide (with every <details> opened)."""
    probe = work / "probe.html"
    script = MEASURE_SCRIPT.replace("OPEN_DETAILS", "true" if open_details else "false")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    result = chromium([f"--window-size={width},900", "--dump-dom", probe.as_uri()], work / "profile")
    found = re.search(r'<pre id="layout-boxes">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def page_screenshot(page: Path, work: Path, height: int, width: int = 1280) -> Image.Image:
    """The whole page (`height` px, from page_layout) as one RGB image."""
    shot = work / "page.png"
    result = chromium([f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                      work / "profile")
    assert shot.is_file(), result.stderr[-2000:]
    return Image.open(shot).convert("RGB")


def section_screenshots(page: Path, work: Path, width: int = 1280) -> tuple[dict, dict[str, Image.Image]]:
    """The layout and one screenshot per section (its whole box) of `page`."""
    layout = page_layout(page, work, width)
    full = page_screenshot(page, work, int(layout["height"]) + 1, width)
    shots = {}
    for tag, section, left, top, box_width, box_height in layout["boxes"]:
        if tag == "section" and box_height > 0:
            shots[section] = full.crop((0, int(top), width, min(full.height, int(top + box_height) + 1)))
    return layout, shots


def save_docs_screenshots(page: Path, folder: Path, prefix: str, work: Path, first_screen: int = 900,
                          most: int = 900) -> list[Path]:
    """docs/img's images of a report: its first screen, then the top `most` px of each section,
    as 256-colour PNGs (small enough for the repository)."""
    layout, shots = section_screenshots(page, work)
    full = page_screenshot(page, work, first_screen)
    images = {"first-screen": full, **{key: shot.crop((0, 0, shot.width, min(shot.height, most)))
                                       for key, shot in shots.items()}}
    written = []
    for key, image in images.items():
        path = folder / f"{prefix}-{key}.png"
        image.quantize(256).save(path, optimize=True)
        written.append(path)
    return written


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    torch.manual_seed(0)
    clf = root / "clf"
    save_classifier(clf, create_classifier("tinycnn", num_classes=10, in_chans=1),
                    {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    other = root / "other-clf"  # a second classifier: the corruption suite compares two
    save_classifier(other, create_classifier("tinycnn", num_classes=10, in_chans=1),
                    {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    train = load_dataset("digits?n=120")
    samples = {}
    for name, index in (("baseline", range(0, 40)), ("copies", range(40, 80))):
        samples[name] = str(root / name)
        write_labeled_shards(root / name, train.subset(index), train.info.class_names, job=name)
    results = root / "results"
    uncond = root / "uncond"  # an (untrained) unconditional model: DiffAug-Ensemble needs no labels
    save_diffusion_model(uncond, build_unet("tiny", image_size=8, channels=1, num_classes=None),
                         DDPMScheduler(num_train_timesteps=1000), ModelMeta(image_size=8, channels=1, num_classes=None))
    assert main(["eval", "accuracy", "--classifier", str(clf), "--dataset", "digits?n=30", "--split", "train",
                 "--json", str(root / "accuracy.json"), "--diffaug-ensemble", str(uncond)]) == 0
    assert main(["eval", "corruptions", "--classifier", str(clf), "--dataset", "digits", "--out", str(results / "corr"),
                 "--corruptions", "gaussian_noise,contrast", "--severities", "1,5", "--limit", "40", "--quiet",
                 "--device", "cpu"]) == 0
    assert main(["eval", "corruptions", "--classifier", str(other), "--dataset", "digits", "--out",
                 str(results / "corr-other"), "--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
                 "--limit", "40", "--quiet", "--device", "cpu"]) == 0
    assert main(["eval", "ood", "--classifier", str(clf), "--dataset", "digits?n=200", "--out", str(results / "ood"),
                 "--num", "40", "--knn-k", "5", "--device", "cpu"]) == 0
    assert main(["eval", "memorization", "--shards", samples["copies"], "--dataset", "digits?n=120",
                 "--out", str(results / "mem"), "--device", "cpu"]) == 0
    net, _ = load_classifier(clf)
    (results / "fid").mkdir()
    write_json_atomic(results / "fid" / "fidelity.json",
                      {**fidelity_report(net, train.images[:60], train.images[60:], None, folds=2),
                       "config": {"shards": samples["baseline"], "classifier": str(clf)}})
    # an EMM study's output shape (rendering fixture: training models is too slow for a unit test)
    points = [{"size": n, "full": False, "memorization_ratio": r, "distinct_train_images_replicated": d,
               "median_ratio_d1_d2": m, "run": f"n{n}", "seconds": {}} for n, r, d, m in
              ((25, 1.0, 25, 0.05), (100, 0.7, 80, 0.2), (400, 0.05, 10, 0.8))]
    (results / "emm").mkdir()
    write_json_atomic(results / "emm" / "emm.json", tag_result("emm", {
        "config": {"dataset": "digits", "labels": "true", "dummy": 0, "steps": 10, "epsilon": 0.1},
        "points": points, "emm": estimate_emm([25, 100, 400], [1.0, 0.7, 0.05]), "wall_seconds": 1.0}))
    assert main(["eval", "entropy", "--classifier", str(clf), "--dataset", "digits?n=30", f"shards:{samples['copies']}",
                 "--json", str(results / "entropy.json")]) == 0
    return {"root": root, "clf": str(clf), "samples": samples, "results": [str(results), str(root / "accuracy.json")],
            "corruption_results": [results / "corr" / "corruptions.json", results / "corr-other" / "corruptions.json"]}


def _figures(page: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


#: a finding as eval.findings.decide writes it (the report's lead section renders these rows)
FINDING = {"paper": "Sastry et al. 2023", "finding": "DiffAug keeps clean accuracy", "difference": "test accuracy",
           "direction": "not_greater", "min_effect": 0.01, "estimate": -0.002, "low": -0.01, "high": 0.005,
           "level": 0.95, "method": "paired bootstrap", "items": 360, "seeds": 1, "verdict": "reproduced"}


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = write_report(out, results=inputs["results"], samples=inputs["samples"], classifier=inputs["clf"],
                          dataset="digits?n=300", lead=[findings_section([FINDING], "digits, one seed")],
                          settings=CorruptionSuiteConfig(classifier=inputs["clf"], dataset="digits"))
    return out, report


def test_report_sections_and_figures(written):
    out, report = written
    expected = {"findings", "samples", "density", "accuracy", "corruptions", "ood", "fidelity", "memorization", "emm",
                "entropy"}
    assert expected <= set(report["present"]), report["absent"]
    accuracy = next(iter(report["sections"]["accuracy"]["data"]["accuracy"].values()))
    assert accuracy["n"] == accuracy["diffaug_ensemble"]["n"] == 30  # with and without DiffAug-Ensemble
    emm = report["sections"]["emm"]["data"]
    assert next(iter(emm.values()))["emm"]["lower_size"] == 25
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    figures = _figures(page)
    assert len(figures) == page.count("<figure>") >= 10
    for image in figures:  # every figure decodes and is not blank
        assert np.asarray(image.convert("L")).std() > 0
    for section in report["sections"].values():
        for figure in section.get("figures", []):
            assert figure["config"], figure["title"]  # each figure says what produced it
    assert json.loads((out / "report.json").read_text())["present"] == report["present"]


def test_absent_inputs_are_reported_absent(tmp_path):
    report = write_report(tmp_path, results=[], samples={})
    assert report["present"] == [] and set(report["absent"]) == {
        "samples", "density", "accuracy", "corruptions", "ood", "fidelity", "memorization", "emm", "emm_study",
        "reconstruction", "entropy"}
    page = (tmp_path / "report.html").read_text()
    assert page.count('data-absent="yes"') == 11 and "<img" not in page


def _sections(page: str) -> dict[str, str]:
    """Each <section>'s HTML by its id, in page order."""
    return dict(re.findall(r'<section id="([^"]+)"[^>]*>(.*?)</section>', page, re.S))


def _shown(html_of_section: str) -> str:
    """A section's HTML without its folded per-run details."""
    return re.sub(r'<details class="per-run".*?</details>\s*(?=</section>|$)', "", html_of_section, flags=re.S)


def test_findings_first_then_one_comparison_table_and_example_grid_per_suite(written):
    out, report = written
    page = (out / "report.html").read_text()
    sections = _sections(page)
    assert list(sections)[0] == "findings" and report["present"][0] == "findings"
    assert "95 % interval" in sections["findings"] and 'class="reproduced"' in sections["findings"]
    for key in ("accuracy", "corruptions", "ood", "fidelity", "memorization", "emm", "entropy"):
        assert _shown(sections[key]).count("<table") == 1, key  # one comparison table; the rest folded
    for key in ("samples", "density", "accuracy", "ood", "emm"):
        assert _shown(sections[key]).count("<figure>") == 1, key  # one figure (density: no result, histograms only)
    # two classifiers corrupt the same images: their example grid is shown once, labelled
    corruptions = report["sections"]["corruptions"]
    assert [f["title"] for f in corruptions["figures"]].count("corrupted examples") == 1
    assert len(report["sections"]["samples"]["figures"]) == 1  # every set's grid in one figure
    # the note both runs share ("not computed: ...") is said once, for every run
    shared = [n for n in corruptions["notes"] if n.startswith("not computed")]
    assert len(shared) == 1 and "(every run)" in shared[0]
    table = next(t for t in corruptions["tables"] if not t["folded"])
    assert len(table["rows"]) == 2 and MEAN_CORRUPTION_ACCURACY in table["note"]
    # settings: a table of every field with its comment, not a JSON blob
    settings = report["sections"]["settings"]["tables"][0]
    assert ["severities", "1, 2, 3, 4, 5"] == settings["rows"][[r[0] for r in settings["rows"]].index("severities")][:2]
    assert all(r[2] for r in settings["rows"])  # each says what it sets


def test_mean_corruption_accuracy_is_the_results_and_its_interval_covers_it(inputs):
    """One definition: the table shows the result's own mean corruption accuracy, and the
    per-image bootstrap's estimate is the same number (the mean over corruptions and severities)."""
    path = next(p for p in inputs["corruption_results"])
    result = json.loads(path.read_text())
    interval = _corruption_interval(result)
    assert mean_corruption_accuracy(result) == result["mean_corruption_accuracy"]
    assert interval.estimate == pytest.approx(result["mean_corruption_accuracy"])
    assert interval.low <= interval.estimate <= interval.high and interval.items == 40


def test_class_columns_put_each_class_in_its_column():
    labels = [3, 0, 0, 1, 3, 0]
    assert class_columns(labels, 4, 2) == [1, 3, None, 0, 2, None, None, 4]


@needs_chromium
def test_report_renders_in_headless_chromium(written, tmp_path):
    out, _ = written
    result = chromium(["--dump-dom", (out / "report.html").as_uri()], tmp_path / "profile")
    dom = result.stdout
    assert 'data-loaded="yes"' in dom, result.stderr[-2000:]
    rendered = re.findall(r'data-rendered="(\w+)"', dom)
    sizes = re.findall(r'data-size="(\d+)x(\d+)"', dom)
    assert rendered and set(rendered) == {"yes"} and len(rendered) == dom.count("<figure>")
    assert all(int(w) > 0 and int(h) > 0 for w, h in sizes)


@needs_chromium
def test_every_section_screenshot_is_not_blank(written, tmp_path):
    out, report = written
    _, shots = section_screenshots(out / "report.html", tmp_path)
    assert set(report["present"]) <= set(shots)
    for key, shot in shots.items():
        assert len(shot.getcolors(maxcolors=1 << 20) or [0, 0]) > 1, f"section {key} renders as one colour"


def _overlap(a: list[float], b: list[float]) -> float:
    """Area shared by two boxes [left, top, width, height]."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


@needs_chromium
def test_no_figure_overlaps_text_or_another_figure(written, tmp_path):
    """Laid out at a laptop's and a narrow window's width, with every folded detail open."""
    out, _ = written
    for width in (1280, 800):
        boxes = page_layout(out / "report.html", tmp_path, width, open_details=True)["boxes"]
        images = [b for b in boxes if b[0] == "img" and b[4] * b[5] > 0]
        text = [b for b in boxes if b[0] in ("p", "figcaption", "caption", "h2", "summary", "li", "table")
                and b[4] * b[5] > 0]
        assert len(images) >= 10
        for i, image in enumerate(images):
            assert image[2] + image[4] <= width + 1, f"figure wider than the window in {image[1]}"
            for other in text + images[i + 1:]:
                assert _overlap(image[2:], other[2:]) < 1, (width, image, other)


def test_names_from_data_are_drawn_as_text_not_mathtext(monkeypatch):
    """A set named ``$\\frac{1}{0}$`` is shown as those characters (matplotlib would typeset it,
    and raise on ``$x^$``), in titles, axis labels and legends alike."""
    import matplotlib.text

    from tailforge.eval.report import line_figure

    drawn = []
    preprocess = matplotlib.text.Text._preprocess_math
    monkeypatch.setattr(matplotlib.text.Text, "_preprocess_math",
                        lambda self, text: drawn.append(preprocess(self, text)) or drawn[-1])
    line_figure({"$\\frac{1}{0}$": ([0, 1], [0, 1]), "a $x^$ b": ([0, 1], [1, 0])}, "$x$ label", "y", "$t$ title")
    texts = {text: math for text, math in drawn}
    assert all(texts[t] is False for t in ("$\\frac{1}{0}$", "a $x^$ b", "$x$ label", "$t$ title")), texts
