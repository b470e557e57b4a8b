"""The embedded default (`tailforge demo`, `make demo`): the project's main job end to end.

On scikit-learn's bundled digits by default, on a local Ray instance (or the cluster at
``--address``):

1. models: one diffusion model trained with label dropout, so that it is class-conditional
   (generation, guidance, reconstruction) and, given the null class, unconditional (DiffAug and
   DiffAug-Ensemble, which see no labels); an independent evaluation classifier that never guides;
   and the guidance nets of Sehwag et al. 2022, on x0_hat, and as noisy and as denoise-augmented
   classifiers (Sastry et al. 2023);
2. shard sets on the actor pool: baseline and low-density samples from the same seeds (low-density ones
   also guided by noisy and by denoise-augmented guidance classifiers, Sastry et al. 2023), the training
   split reconstructed at t_re (Yamaguchi & Fukuda 2023), and the test split for Fig. 5's entropy;
3. classifiers with the same architecture, seed, epochs and steps: real, real + baseline,
   real + low-density, real + reconstructed, real with DiffAug on the fly (Sastry et al. 2023);
4. evaluations (accuracy, corruptions, OOD, DiffAug-Ensemble; density, fidelity, memorization),
   ``report/report.html`` + ``report/report.json`` led by the papers' findings this run checks;
5. a summary table.

Every stage writes into its own folder under --out and is reused when its output is there with
the same config (models resume from their checkpoints, generation jobs from their shard records),
so a second run only re-evaluates what changed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from tailforge.config import DemoConfig
from tailforge.eval.accuracy import accuracy_report
from tailforge.eval.config import CorruptionSuiteConfig, DensityConfig, FidelityConfig, MemorizationConfig, OODConfig
from tailforge.eval.corruptions import run_corruption_suite
from tailforge.eval.density import evaluate_density
from tailforge.eval.entropy import output_entropy
from tailforge.eval.features import wrap_diffaug_ensemble
from tailforge.eval.fidelity import run_fidelity
from tailforge.eval.findings import decide
from tailforge.eval.memorization import run_memorization
from tailforge.eval.ood import run_ood
from tailforge.eval.report import (
    MEAN_CORRUPTION_ACCURACY,
    Section,
    findings_section,
    mean_corruption_accuracy,
    write_report,
)
from tailforge.eval.results import is_current, tag_result
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.files import config_dict, read_json, saved_result, write_json_atomic
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.jobs.config import BaselineConfig, LowDensityConfig, ReconstructConfig
from tailforge.gen.jobs.runner import run_generation
from tailforge.gen.models.classifiers import CLASSIFIER_CONFIG, load_classifier, predict_logits
from tailforge.gen.models.diffusion import load_diffusion_model
from tailforge.train.classifier import train_classifier
from tailforge.train.config import REAL, ClassifierTrainConfig, DiffusionTrainConfig, GuidanceTrainConfig, MixSource
from tailforge.train.diffusion import train_diffusion
from tailforge.train.guidance import train_guidance

#: Sastry et al. 2023's comparison of guidance classifiers: noisy classifiers (x_t only) against denoise-augmented
#: ones (x_t and its denoised estimate), each trained as the guidance nets of a low-density set of its own
GUIDANCE_COMPARISON = {"noisy": "xt", "da": "xt+x0"}


def _paths(config: DemoConfig) -> dict[str, Path]:
    out = Path(config.out)
    return {"diffusion": Path(config.diffusion_model) if config.diffusion_model else out / "models" / "diffusion",
            "reference": out / "models" / "reference-classifier", "guidance": out / "models" / "guidance",
            **{f"guidance-{name}": out / "models" / f"guidance-{name}" for name in GUIDANCE_COMPARISON},
            "baseline": out / "shards" / "baseline", "lowdensity": out / "shards" / "lowdensity",
            **{f"lowdensity-{name}": out / "shards" / f"lowdensity-{name}" for name in GUIDANCE_COMPARISON},
            "reconstructed": out / "shards" / "reconstructed",
            "reconstructed-test": out / "shards" / "reconstructed-test", "classifiers": out / "classifiers",
            "eval": out / "eval", "report": out / "report"}


def _reuse(path: Path, wanted: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON result at `path` if it was made with the config `wanted` (its "config" field), else compute it."""
    saved = saved_result(path, wanted)
    # a result of an older layout (or from before results said their kind) is one the report cannot read
    return saved if saved is not None and is_current(saved) else compute()


def _classifier(config: ClassifierTrainConfig, out: Path) -> float:
    """Train (or reuse) a classifier; its test accuracy."""
    saved = saved_result(out / CLASSIFIER_CONFIG, config_dict(config), "classifier description", key="train_config")
    return float(saved["test_accuracy"]) if saved else train_classifier(config, out)[1]


def train_models(config: DemoConfig, paths: dict[str, Path]) -> None:
    """Stage 1: the diffusion model (unless one is given), the evaluation classifier and the guidance nets."""
    if not config.diffusion_model:
        train_diffusion(DiffusionTrainConfig(dataset=config.dataset, preset=config.unet_preset,
                                             batch_size=config.diffusion_batch_size, seed=config.seed,
                                             steps=config.diffusion_steps, label_dropout=config.label_dropout),
                        paths["diffusion"])
    _classifier(ClassifierTrainConfig(dataset=config.reference_dataset or config.dataset,
                                      model=config.reference_classifier, epochs=config.reference_epochs,
                                      seed=config.seed + 1), paths["reference"])
    guidance = GuidanceTrainConfig(dataset=config.dataset, model=str(paths["diffusion"]), epochs=config.guidance_epochs,
                                   synthetic=config.sampling, seed=config.seed)
    for folder, settings in [(paths["guidance"], guidance)] + [
            (paths[f"guidance-{name}"], dataclasses.replace(guidance, input=input))
            for name, input in GUIDANCE_COMPARISON.items()]:
        if saved_result(folder / "guidance.json", config_dict(settings)) is None:
            train_guidance(settings, folder)


def generate_shards(config: DemoConfig, paths: dict[str, Path], address: str | None) -> None:
    """Stage 2: baseline, low-density and reconstructed shard sets on the Ray actor pool."""
    model = str(paths["diffusion"])
    baseline = BaselineConfig(model=model, num=config.num_samples, sampling=config.sampling, seed=config.seed,
                              shard_size=max(1, config.num_samples // 4))
    run_generation(paths["baseline"], baseline, actors=config.actors, address=address)
    lowdensity = LowDensityConfig(model=model, guidance=str(paths["guidance"]), num=config.num_samples,
                                  sampling=config.sampling, guide=config.guide, seed=config.seed,
                                  shard_size=baseline.shard_size)
    run_generation(paths["lowdensity"], lowdensity, actors=config.actors, address=address)
    for name in GUIDANCE_COMPARISON:  # the same samples' seeds, guided by noisy or by DA classifiers
        run_generation(paths[f"lowdensity-{name}"],
                       dataclasses.replace(lowdensity, guidance=str(paths[f"guidance-{name}"])),
                       actors=config.actors, address=address)
    for split in ("train", "test"):  # train: a training set (Yamaguchi & Fukuda 2023 Table 2); test: only for Fig. 5's entropy
        size = len(load_dataset(config.dataset, split))
        reconstruct = ReconstructConfig(model=model, dataset=config.dataset, split=split, t_re=config.t_re,
                                        sampling=config.sampling, seed=config.seed,
                                        shard_size=max(1, -(-size // 4)))
        run_generation(paths["reconstructed" if split == "train" else "reconstructed-test"], reconstruct,
                       actors=config.actors, address=address)


def classifier_configs(config: DemoConfig, paths: dict[str, Path]) -> dict[str, ClassifierTrainConfig]:
    """Stage 3's classifiers: one architecture, seed, epoch count and epoch size; only the data differs."""
    base = ClassifierTrainConfig(dataset=config.dataset, model=config.classifier, epochs=config.classifier_epochs,
                                 seed=config.seed)

    def with_set(name: str) -> ClassifierTrainConfig:
        return dataclasses.replace(base, mix=(MixSource(REAL, 1.0),
                                              MixSource(name, config.synthetic_weight, str(paths[name]))))

    return {"real": base, "real+baseline": with_set("baseline"), "real+lowdensity": with_set("lowdensity"),
            "real+reconstructed": with_set("reconstructed"),
            "real+diffaug": dataclasses.replace(base, diffaug=str(paths["diffusion"]),
                                                diffaug_actors=config.diffaug_actors)}


def _accuracy(name: str, folder: Path, config: DemoConfig, ensemble: str | None, out: Path) -> dict[str, Any]:
    """Test accuracy (and DiffAug-Ensemble's with `ensemble`) in `eval accuracy --json`'s format."""
    key = {"classifier": str(folder), "dataset": config.dataset, "split": "test", "diffaug_ensemble_model": ensemble}

    def compute() -> dict[str, Any]:
        model, saved = load_classifier(folder)
        test = load_dataset(config.dataset, "test")
        num_classes = int(saved["num_classes"])
        report = tag_result("accuracy", {"name": name, **key, "config": key,
                                         **accuracy_report(predict_logits(model, test.images), test.labels,
                                                           num_classes)})
        if ensemble:
            wrapped = wrap_diffaug_ensemble(model, ensemble)
            report["diffaug_ensemble"] = {"model": ensemble, **accuracy_report(
                predict_logits(wrapped, test.images), test.labels, num_classes)}
        write_json_atomic(out, report)
        return report

    return _reuse(out, key, compute)


def evaluate(config: DemoConfig, paths: dict[str, Path], classifiers: dict[str, Path]) -> dict[str, Any]:
    """Stage 4: every evaluation suite, each result reused when its config is unchanged."""
    ev, ref = paths["eval"], str(paths["reference"])
    uncond = str(paths["diffusion"])  # called without labels: its null class
    results: dict[str, Any] = {"accuracy": {}, "corruptions": {}, "density": {}, "fidelity": {}}
    ensemble_of = {"real", "real+diffaug"}  # Sastry et al. 2023 evaluates DiffAug-Ensemble on plain and DiffAug classifiers
    for name, folder in classifiers.items():
        results["accuracy"][name] = _accuracy(name, folder, config, uncond if name in ensemble_of else None,
                                              ev / "accuracy" / f"{name}.json")
        for wrapped in ([None, uncond] if name in ensemble_of else [None]):
            suite = CorruptionSuiteConfig(classifier=str(folder), dataset=config.dataset,
                                          corruptions=config.corruptions, severities=config.severities,
                                          reference_size=config.corruption_reference_size,
                                          limit=config.corruption_items, diffaug_ensemble=wrapped)
            label = name + (" + DiffAug-Ensemble" if wrapped else "")
            folder_out = ev / "corruptions" / (name + ("-de" if wrapped else ""))
            results["corruptions"][label] = _reuse(folder_out / "corruptions.json", config_dict(suite),
                                                   lambda s=suite, o=folder_out: run_corruption_suite(s, o))
    # OOD detection of the plain and the DiffAug-trained classifier, and of the latter with
    # DiffAug-Ensemble (Sastry et al. 2023's OOD claim)
    results["ood_by_classifier"] = {}
    for label, name, wrapped, folder_out in (("real", "real", None, ev / "ood"),
                                             ("real+diffaug", "real+diffaug", None, ev / "ood-diffaug"),
                                             ("real+diffaug + DiffAug-Ensemble", "real+diffaug", uncond,
                                              ev / "ood-diffaug-de")):
        ood = OODConfig(dataset=config.dataset, classifier=str(classifiers[name]), diffaug_ensemble=wrapped)
        results["ood_by_classifier"][label] = _reuse(folder_out / "ood.json", config_dict(ood),
                                                     lambda c=ood, o=folder_out: run_ood(c, o))
    density = DensityConfig()
    for name in ("baseline", "lowdensity", *(f"lowdensity-{n}" for n in GUIDANCE_COMPARISON)):
        target = ev / "density" / f"{name}.json"

        def compute_density(name=name, target=target) -> dict[str, Any]:
            report = {**evaluate_density(paths[name], config.dataset, ref, density), "config": density_key(name)}
            write_json_atomic(target, report)
            return report

        def density_key(name: str) -> dict[str, Any]:
            return {"shards": str(paths[name]), "classifier": ref, "dataset": config.dataset, **config_dict(density)}

        results["density"][name] = _reuse(target, density_key(name), compute_density)
        if name not in ("baseline", "lowdensity"):
            continue
        fidelity = FidelityConfig(shards=str(paths[name]), dataset=config.dataset, classifier=ref)
        results["fidelity"][name] = _reuse(ev / "fidelity" / name / "fidelity.json", config_dict(fidelity),
                                           lambda f=fidelity, n=name: run_fidelity(f, ev / "fidelity" / n))
    memorization = MemorizationConfig(dataset=config.dataset, shards=str(paths["baseline"]), classifier=ref)
    results["memorization"] = _reuse(ev / "memorization" / "memorization.json", config_dict(memorization),
                                     lambda: run_memorization(memorization, ev / "memorization"))
    results["entropy"] = reconstruction_entropy(config, paths)
    # each guidance classifier's correctness per held-out image and noise level, as its training measured it
    results["guidance_classifiers"] = {name: read_json(paths[f"guidance-{name}"] / "guidance.json", "guidance description")
                                       for name in GUIDANCE_COMPARISON}
    return results


def reconstruction_entropy(config: DemoConfig, paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Yamaguchi & Fukuda 2023 Fig. 5: the evaluation classifier's output entropy (Eq. 4) on the real
    images and on their reconstructions at t_re, per image (reconstruction i is that of image i), for
    the training and the test split (Fig. 5's "Train/Test Samples")."""
    net, _ = load_classifier(paths["reference"])
    entropy = {}
    for split, shards in (("train", paths["reconstructed"]), ("test", paths["reconstructed-test"])):
        real = load_dataset(config.dataset, split)
        reconstructed = load_dataset(f"shards:{shards}", "train")  # a shard set's samples form its "train" split
        entropy[split] = {"t_re": config.t_re, **{
            name: [round(float(h), 6) for h in output_entropy(predict_logits(net, images.images))]
            for name, images in (("real", real), ("reconstructed", reconstructed))}}
    return entropy


def demo_findings(rows: list[dict[str, Any]], config: dict[str, Any]) -> Section:
    """The report's lead: the findings with their intervals, and what an inconclusive one needs."""
    section = findings_section(rows, f"{config['dataset']}, one training seed")
    test_items = [r["items"] for r in rows if r["difference"].startswith("test accuracy")]
    if any(r["verdict"] == "inconclusive" for r in rows) and test_items:
        section.notes.append(
            f"An inconclusive finding needs more data than this run has: the classifier comparisons rest on the "
            f"{test_items[0]} test images of {config['dataset']} and one seed, where one image is "
            f"{100 / test_items[0]:.2g} points of accuracy; the Fashion-MNIST study (10,000 test images, several "
            "seeds) is where they can be decided.")
    return section


def write_demo_report(config: DemoConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 5: the report, from what the earlier stages saved under --out (evaluation results,
    shard sets, the evaluation classifier) and the findings; run_demo calls it, and
    :func:`rerender_report` calls it for a finished run without re-running any stage."""
    paths = _paths(config)
    return write_report(
        paths["report"], results=[str(paths["eval"])],
        samples={name: str(paths[name]) for name in ("baseline", "lowdensity", "reconstructed",
                                                       *(f"lowdensity-{n}" for n in GUIDANCE_COMPARISON))},
        classifier=str(paths["reference"]), dataset=config.dataset, title="tailforge demo",
        lead=[demo_findings(rows, config_dict(config))], settings=config)


def rerender_report(config: DemoConfig) -> dict[str, Any]:
    """Re-render the report of a finished run with these settings (its --out) from the run's
    summary.json (the findings) and saved results, running no stage: what to call after changing
    the report rather than the run."""
    summary = read_json(Path(config.out) / "summary.json", "demo summary")
    differing = sorted(k for k, v in config_dict(config).items() if summary["config"].get(k) != v)
    if differing:
        raise ConfigError(f"{Path(config.out) / 'summary.json'}: the run was made with other settings "
                          f"({', '.join(differing)}); pass those to re-render its report")
    return write_demo_report(config, summary["findings"])


def check_inputs(config: DemoConfig) -> None:
    """Refuse, before any stage runs, a given diffusion model or an evaluation classifier's dataset whose images
    differ from the demo dataset's, and a model DiffAug cannot call without labels (one line naming it)."""
    ours = load_dataset(config.dataset, "test").info
    shape = (ours.image_size, ours.channels, ours.num_classes)
    given = []
    if config.diffusion_model:
        meta = load_diffusion_model(config.diffusion_model).meta
        if meta.num_classes is None or not meta.denoises_without_labels:
            raise ConfigError(f"diffusion_model {config.diffusion_model}: the demo needs a class-conditional model "
                              "trained with label dropout (guidance needs labels, DiffAug a null class)")
        given.append(("diffusion_model", config.diffusion_model, (meta.image_size, meta.channels, meta.num_classes)))
    if config.reference_dataset:
        theirs = load_dataset(config.reference_dataset, "test").info
        given.append(("reference_dataset", config.reference_dataset,
                      (theirs.image_size, theirs.channels, theirs.num_classes)))
    for field, value, found in given:
        if found != shape:
            raise ConfigError(f"{field} {value!r}: its images ({found[0]} px, {found[1]} channels, {found[2]} "
                              f"classes) differ from those of dataset {config.dataset!r} ({shape[0]} px, {shape[1]} "
                              f"channels, {shape[2]} classes)")


def run_demo(config: DemoConfig, *, address: str | None = None) -> dict[str, Any]:
    check_inputs(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(config)
    seconds: dict[str, float] = {}

    def stage(number: int, name: str, what: str, fn: Callable[[], Any]) -> Any:
        print(f"[{number}/5] {what}", flush=True)
        started = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - started, 1)
        return value

    stage(1, "models", f"diffusion model, evaluation classifier and guidance nets -> {out / 'models'}",
          lambda: train_models(config, paths))
    stage(2, "shards", f"baseline, low-density and reconstructed shards on the Ray actor pool -> "
                       f"{out / 'shards'}", lambda: generate_shards(config, paths, address))
    configs = classifier_configs(config, paths)
    folders = {name: paths["classifiers"] / name.replace("+", "-") for name in configs}
    stage(3, "classifiers", f"{len(configs)} classifiers ({', '.join(configs)}) -> {paths['classifiers']}",
          lambda: [_classifier(c, folders[name]) for name, c in configs.items()])
    results = stage(4, "evaluation", f"accuracy, corruptions, OOD, density, fidelity, memorization -> {paths['eval']}",
                    lambda: evaluate(config, paths, folders))
    rows = decide(results)
    stage(5, "report", f"report -> {paths['report'] / 'report.html'}", lambda: write_demo_report(config, rows))
    summary = {"config": config_dict(config), "findings": rows, "seconds": seconds,
               "classifiers": {name: {"test_accuracy": results["accuracy"][name]["top1"],
                                      "mean_corruption_accuracy": mean_corruption_accuracy(results["corruptions"][name])}
                               for name in configs},
               "report": str(paths["report"] / "report.html")}
    write_json_atomic(out / "summary.json", summary)
    print_summary(summary, results)
    return summary


def print_summary(summary: dict[str, Any], results: dict[str, Any]) -> None:
    print(f"\n{'classifier':<34}{'test acc':>10}{'mean corruption acc':>21}")
    for name, row in results["corruptions"].items():
        accuracy = results["accuracy"].get(name.removesuffix(" + DiffAug-Ensemble"), {})
        top1 = accuracy.get("diffaug_ensemble", {}).get("top1") if name.endswith("Ensemble") else accuracy.get("top1")
        mean = mean_corruption_accuracy(row)
        print(f"{name:<34}{top1 if top1 is not None else float('nan'):>10.4f}"
              f"{mean if mean is not None else float('nan'):>21.4f}")
    print(f"({MEAN_CORRUPTION_ACCURACY}; as in the report)")
    print(f"\n{'shard set':<16}{'hardness med':>14}{'AvgkNN med':>12}{'LOF med':>10}{'precision':>11}{'class agr.':>12}")
    for name, row in results["density"].items():
        s = row["samples"]
        print(f"{name:<16}{s['hardness']['median']:>14.2f}{s['avg_knn']['median']:>12.3f}{s['lof']['median']:>10.3f}"
              f"{s['precision']:>11.3f}{s['accuracy']:>12.3f}")
    print()
    for row in summary["findings"]:
        print(f"[{row['verdict']:>12}] {row['paper']}: {row['finding']}")
        print(f"{'':15}{row['difference']}: {row['estimate']:+.4f}, 95 % [{row['low']:+.4f}, {row['high']:+.4f}] "
              f"({row['items']} items, {row['seeds']} seed)")
    print(f"\nseconds per stage: {summary['seconds']} (total {sum(summary['seconds'].values()):.0f})")
    print(f"report: {summary['report']}\nsummary: {Path(summary['report']).parents[1] / 'summary.json'}")

