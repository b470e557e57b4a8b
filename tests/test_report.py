"""The report gathers real (small) evaluation outputs, embeds every figure, and renders offline."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from tailforge.cli import main
from tailforge.eval.emm import estimate_emm, write_labeled_shards
from tailforge.eval.fidelity import fidelity_report
from tailforge.eval.report import write_report
from tailforge.eval.results import tag_result
from tailforge.gen.core.files import write_json_atomic
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.models.classifiers import create_classifier, load_classifier, save_classifier
from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
from tailforge.gen.models.unet import build_unet

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    torch.manual_seed(0)
    clf = root / "clf"
    save_classifier(clf, create_classifier("tinycnn", num_classes=10, in_chans=1),
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
    return {"root": root, "clf": str(clf), "samples": samples, "results": [str(results), str(root / "accuracy.json")]}


def _figures(page: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = write_report(out, results=inputs["results"], samples=inputs["samples"], classifier=inputs["clf"],
                          dataset="digits?n=300")
    return out, report


def test_report_sections_and_figures(written):
    out, report = written
    expected = {"samples", "density", "accuracy", "corruptions", "ood", "fidelity", "memorization", "emm", "entropy"}
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
        "samples", "density", "accuracy", "corruptions", "ood", "fidelity", "memorization", "emm", "entropy"}
    page = (tmp_path / "report.html").read_text()
    assert page.count('data-absent="yes"') == 9 and "<img" not in page


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium not installed (HTML structure is "
                    "checked by test_report_sections_and_figures)")
def test_report_renders_in_headless_chromium(written, tmp_path):
    out, _ = written
    profile = tmp_path / "profile"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert 'data-loaded="yes"' in dom, result.stderr[-2000:]
    rendered = re.findall(r'data-rendered="(\w+)"', dom)
    sizes = re.findall(r'data-size="(\d+)x(\d+)"', dom)
    assert rendered and set(rendered) == {"yes"} and len(rendered) == dom.count("<figure>")
    assert all(int(w) > 0 and int(h) > 0 for w, h in sizes)
    shutil.rmtree(profile, ignore_errors=True)


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
