"""`tailforge eval ...`: evaluations of classifiers and shard sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tailforge.cli.commands import (
    Command,
    add_device_option,
    add_json_option,
    add_out_option,
    add_quiet_option,
    add_ray_options,
    name_value_pairs,
    print_json,
    print_report,
    value_type,
)
from tailforge.cli.flags import Flag, config_from_args
from tailforge.gen.core.checks import PositiveInt


def corruption_names(text: str) -> tuple[str, ...]:
    """Comma-separated corruption names; `all` (an empty tuple in the config) is every one that applies."""
    return () if text == "all" else tuple(name.strip() for name in text.split(","))


#: --corruptions NAME,NAME | all (eval corruptions, demo)
CORRUPTION_NAMES = Flag(parse=corruption_names, show=lambda names: ",".join(names) or "all")


def accuracy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", required=True, help="classifier folder (tailforge train classifier)")
    parser.add_argument("--dataset", required=True, help="dataset spec, e.g. digits or shards:OUT")
    parser.add_argument("--split", default="test", help="split to evaluate (shard sets have only 'train')")
    add_json_option(parser)
    parser.add_argument("--diffaug-ensemble", default=None, metavar="MODEL_DIR",
                        help="also evaluate DiffAug-Ensemble of the classifier with this (unconditional) diffusion "
                             "model: mean softmax over t in {0, 50, ..., 450} (Sastry et al.)")
    parser.add_argument("--skip-bad-shards", action="store_true",
                        help="shards: datasets: skip damaged shards (logged, counted in the report's shard_read) "
                             "instead of stopping at the first one")


def run_accuracy(args: argparse.Namespace) -> int:
    """Classify a dataset split with a saved classifier. On a shard set (shards:PATH) the labels are the classes
    the samples were generated for, so top-1 is the fraction of samples an independent classifier assigns to
    their requested class."""

    from tailforge.eval.accuracy import accuracy_report
    from tailforge.eval.results import tag_result
    from tailforge.gen.core.errors import ConfigError
    from tailforge.gen.data.datasets import load_dataset, with_option
    from tailforge.gen.models.classifiers import load_classifier, predict_logits

    model, config = load_classifier(args.classifier)
    spec = with_option(args.dataset, "skip_bad_shards", "1") if args.skip_bad_shards else args.dataset
    data = load_dataset(spec, args.split)
    if len(data) and int(data.labels.max()) >= int(config["num_classes"]):  # would count as wrong, silently
        raise ConfigError(f"--dataset {args.dataset}: label {int(data.labels.max())} is not below the classifier's "
                          f"num_classes {config['num_classes']} ({args.classifier}); it was trained on other classes")
    report = tag_result("accuracy", {"classifier": args.classifier, "dataset": args.dataset, "split": args.split,
                                     **accuracy_report(predict_logits(model, data.images), data.labels,
                                                       int(config["num_classes"]))})
    if data.read_report:
        report["shard_read"] = data.read_report  # shards read and skipped (--skip-bad-shards)
    if args.diffaug_ensemble:  # the same classifier with and without DiffAug-Ensemble (Sastry et al.)
        from tailforge.eval.features import wrap_diffaug_ensemble

        ensemble = wrap_diffaug_ensemble(model, args.diffaug_ensemble)
        report["diffaug_ensemble"] = {"model": args.diffaug_ensemble, **accuracy_report(
            predict_logits(ensemble, data.images), data.labels, int(config["num_classes"]))}
    print_report(report, args.json)
    return 0


def corruptions_options(parser: argparse.ArgumentParser) -> None:
    from tailforge.eval.config import CORRUPTIONS

    never = [name for name, c in CORRUPTIONS.items() if not c.fn]
    optional = [name for name, c in CORRUPTIONS.items() if c.missing]
    parser.description += (f" Corruptions: {', '.join(CORRUPTIONS)} ({', '.join(never)} cannot be computed here; "
                           f"{', '.join(optional)} only where its optional files are installed, else skipped with a "
                           "note; see tailforge.eval.corruptions).")
    add_out_option(parser)
    add_device_option(parser)
    add_quiet_option(parser)


def run_corruptions(args: argparse.Namespace) -> int:
    """Corrupt the test split with the CIFAR-10-C corruptions (Hendrycks & Dietterich 2019) at severities 1-5,
    computed here for any image size (pixel parameters scaled by size / --reference-size), and classify. Writes
    OUT/corruptions.json (per corruption and severity accuracy, the fraction of images each leaves unchanged,
    per-family and mean corruption accuracy over the benchmark's 15 corruptions that apply) and
    OUT/corruption_examples.png."""

    from tailforge.eval.config import CorruptionSuiteConfig
    from tailforge.eval.corruptions import run_corruption_suite

    report = run_corruption_suite(config_from_args(CorruptionSuiteConfig, args), args.out, device=args.device,
                                  progress=not args.quiet)
    print_json({"out": str(Path(args.out) / "corruptions.json"), "clean_accuracy": report["clean_accuracy"],
                "mean_corruption_accuracy": report["mean_corruption_accuracy"], "families": report["families"],
                "no_effect_at_this_size": report["no_effect_at_this_size"],
                "not_computed": sorted(report["not_computed"])})
    for note in report["notes"]:  # e.g. frost skipped because its photographs are not installed
        print(f"note: {note}", file=sys.stderr)
    return 0


def ood_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    add_device_option(parser)
    add_quiet_option(parser)


def run_ood(args: argparse.Namespace) -> int:
    """Score the ID test split and each OOD set with OpenOOD's postprocessors (feature statistics fitted on the
    ID training split) and report AUROC and FPR@95TPR per set. Default sets, at the dataset's size: near = the
    ID test images rotated 90 degrees, far = mondrian, gm, ri. --holdout-classes trains a fresh classifier
    without those classes and adds their test images as a near-OOD set (open-set protocol). Writes OUT/ood.json
    with ROC curves."""

    from tailforge.eval.config import OODConfig
    from tailforge.eval.ood import run_ood as evaluate_ood

    report = evaluate_ood(config_from_args(OODConfig, args), args.out, device=args.device, progress=not args.quiet)
    table = {name: {s: round(v["auroc"], 4) for s, v in r["scores"].items()} for name, r in report["sets"].items()}
    print_json({"out": str(Path(args.out) / "ood.json"), "auroc": table})
    return 0


def fidelity_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    add_device_option(parser)


def run_fidelity(args: argparse.Namespace) -> int:
    """Compare a shard set with the real training split: Frechet distance between Gaussians of the evaluation
    classifier's embeddings (with the real test-vs-train distance as the floor), and the cross-validated
    accuracy of a linear real-vs-synthetic detector in the pixel and DCT domains (Yamaguchi & Fukuda, Table 1;
    50 % = indistinguishable). Writes OUT/fidelity.json. Precision and recall are in `tailforge eval density`."""

    from tailforge.eval.config import FidelityConfig
    from tailforge.eval.fidelity import run_fidelity as evaluate_fidelity

    report = evaluate_fidelity(config_from_args(FidelityConfig, args), args.out, device=args.device)
    print_json({"out": str(Path(args.out) / "fidelity.json"), "frechet_distance": report["frechet_distance"],
                "frechet_distance_real_test_vs_train": report.get("frechet_distance_real_test_vs_train"),
                "fake_detection": {d: r["accuracy"] for d, r in report["fake_detection"].items()}})
    return 0


def reconstruction_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    add_device_option(parser)


def run_reconstruction(args: argparse.Namespace) -> int:
    """Yamaguchi & Fukuda 2023's measurements of reconstructed data against t_re: for each --shards T=DIR set
    (tailforge gen reconstruct) and for the real split the sets came from (t_re = 0), measured against the real
    --split: Frechet distance in the evaluation classifier's embedding (bootstrap interval), k-NN precision and
    recall, and fake-detection accuracy of a logistic regression (cross-validated) and a small CNN (held out) in
    the pixel and DCT domains (exact intervals; 50 % = indistinguishable). Writes OUT/reconstruction.json,
    OUT/reconstruction_metrics.png (every figure against t_re with its 95 % interval) and
    OUT/reconstruction_pca.png (features on the real split's top two principal components, one panel per t_re)."""

    from tailforge.eval.config import ReconstructionStudyConfig
    from tailforge.eval.reconstruction import run_reconstruction_study

    report = run_reconstruction_study(config_from_args(ReconstructionStudyConfig, args), args.out, device=args.device)
    print_json({"out": str(Path(args.out) / "reconstruction.json"), "points": [
        {"t_re": p["t_re"], "frechet_distance": p["frechet_distance"]["estimate"],
         "precision": p["precision"]["estimate"], "recall": p["recall"]["estimate"],
         "fake_detection": {f"{m} {d}": r[m]["accuracy"] for d, r in p["fake_detection"].items() for m in r}}
        for p in report["points"]]})
    return 0


def memorization_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    add_device_option(parser)
    add_quiet_option(parser)
    add_ray_options(parser)


def run_memorization(args: argparse.Namespace) -> int:
    """For every generated image find its nearest and second-nearest training images (exact, pixel space,
    chunked, GPU when present) and mark it a replicate when d1 < d2/3 (the ratio criterion of Gu et al. and Yoon
    et al.). Writes OUT/memorization.json (memorization_ratio, distinct training images replicated, per class,
    d1/d2 distribution, closest pairs) and OUT/nearest_pairs.png. With --classifier also the feature-space
    nearest-neighbour distances of generated vs held-out real images (Sehwag et al. 2022, Sec. 5). Give exactly
    one of --shards (a generated set) or --model, which generates --num samples first (a baseline job into
    OUT/samples)."""

    from tailforge.eval.config import MemorizationConfig
    from tailforge.eval.memorization import run_memorization as evaluate_memorization

    report = evaluate_memorization(config_from_args(MemorizationConfig, args), args.out, device=args.device,
                                   actors=args.actors, address=args.address, progress=not args.quiet)
    summary = {k: report[k] for k in ("memorization_ratio", "replicates", "distinct_train_images_replicated",
                                      "median_ratio_d1_d2", "num_generated", "num_train")}
    print_json({"out": str(Path(args.out) / "memorization.json"), **summary})
    return 0


def training_set_sizes(text: str) -> tuple[int, ...]:
    """--sizes 50,100,full (eval emm's own syntax, parsed where EMM lives)."""
    from tailforge.eval.emm import parse_sizes

    return parse_sizes(text)


def emm_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    add_ray_options(parser, actors=False)
    parser.add_argument("--in-process", action="store_true", help="train the sizes one after another without Ray")
    add_quiet_option(parser)


def run_emm(args: argparse.Namespace) -> int:
    """Train one diffusion model per training-set size (nested subsets SPEC?n=N) as parallel Ray tasks, sample
    each, measure its memorization ratio (ratio criterion d1 < d2/3) and interpolate EMM, the largest size whose
    ratio is still >= 1 - epsilon (Def. 1). --dummy K injects K Gaussian-mixture dummy images as an extra class
    (Yoon et al., Hypothesis 2); --labels random|unique conditions on uninformative labels (Gu et al., Sec. 6).
    Writes OUT/emm.json and OUT/runs/nN/{model,result.json,nearest_pairs.png}; a re-run reuses finished sizes."""

    from tailforge.eval.config import EMMConfig
    from tailforge.eval.emm import run_emm as evaluate_emm

    report = evaluate_emm(config_from_args(EMMConfig, args), args.out, address=args.address,
                          in_process=args.in_process, progress=not args.quiet)
    print_json({"out": str(Path(args.out) / "emm.json"), "emm": report["emm"],
                "points": [{k: p[k] for k in ("size", "memorization_ratio")} for p in report["points"]],
                "wall_seconds": report["wall_seconds"]})
    return 0


def report_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    parser.add_argument("--results", action="append", metavar="PATH",
                        help="a result JSON or a folder searched recursively; repeatable")
    parser.add_argument("--samples", action="append", metavar="NAME=SHARDS", help="a shard set to show; repeatable")
    parser.add_argument("--classifier", default=None, help="evaluation classifier for the density histograms")
    parser.add_argument("--dataset", default=None, help="real dataset spec (density reference, t_re test split)")
    parser.add_argument("--tre", action="append", metavar="T=CLASSIFIER_DIR",
                        help="classifier trained on data reconstructed at t_re = T; repeatable")
    parser.add_argument("--grid", type=value_type(PositiveInt), default=40, help="samples per grid")
    parser.add_argument("--title", default="tailforge evaluation report", help="report title")


def run_emm_study(args: argparse.Namespace) -> int:
    """Per seed 0..N-1, one fixed-epochs procedure for every run: the nested-size sweep with EMM (Gu et al.,
    Def. 1); the variant-size subset with Gaussian-mixture dummy images (Yoon et al., Hypothesis 2), with random
    and with unique labels (Gu et al., Sec. 6), each against the sweep's run at that size; and a majority and a
    minority class alone (Yoon et al., Hypothesis 3). Every run is a Ray task, cached in OUT/seed-K/RUN. Each
    finding: a two-sample bootstrap per seed, a t-interval across seeds, a verdict by the findings rule.
    Writes OUT/emm-study.json (`tailforge eval report --results OUT` renders it)."""

    from tailforge.eval.config import EMMStudyConfig
    from tailforge.eval.emm_study import run_emm_study as study

    result = study(config_from_args(EMMStudyConfig, args), args.out, address=args.address,
                   in_process=args.in_process, progress=not args.quiet)
    print_json({"out": str(Path(args.out) / "emm-study.json"), "emm": result["emm"], "findings": [
        {k: v for k, v in row.items() if k != "per_seed"} for row in result["findings"]],
        "wall_seconds": result["wall_seconds"]})
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Collect the JSON results of the eval commands (found by the kind each records, under each --results
    path), sample grids of shard sets (--samples NAME=DIR; sets generated with the same seed are paired), density
    histograms (with --classifier and --dataset) and accuracy vs t_re (--tre T=CLASSIFIER). Writes OUT/report.json and
    OUT/report.html (figures embedded; opens offline). Sections whose inputs are missing are listed as absent."""

    from tailforge.eval.report import write_report
    from tailforge.gen.core.errors import ConfigError

    tre = {}
    for name, folder in name_value_pairs(args.tre, "--tre").items():
        try:
            tre[float(name)] = folder
        except ValueError:
            raise ConfigError(f"--tre expects T=CLASSIFIER_DIR with T a number, got {name!r}") from None
    report = write_report(args.out, results=args.results or [], samples=name_value_pairs(args.samples, "--samples"),
                          classifier=args.classifier, dataset=args.dataset, tre=tre, grid=args.grid, title=args.title)
    print_json({"report": str(Path(args.out) / "report.html"), "present": report["present"],
                "absent": report["absent"]})
    return 0


def entropy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", required=True, help="classifier folder (tailforge train classifier)")
    parser.add_argument("--dataset", required=True, nargs="+", metavar="SPEC",
                        help="one or more dataset specs, e.g. shards:R/t_re_0 shards:R/t_re_0p3")
    parser.add_argument("--split", default="train", help="split to measure (shard sets have only 'train')")
    add_device_option(parser, "cpu")
    add_json_option(parser)


def run_entropy(args: argparse.Namespace) -> int:
    """Mean over a dataset of the entropy (nats) of the classifier's softmax output (Eq. 4), overall and per
    true class, with the classifier's top-1 on the same data. Yamaguchi & Fukuda measure the classifier trained
    on real data on reconstructed sets of growing t_re (tailforge gen reconstruct): the entropy falls as the
    reverse process pulls samples towards the modes."""

    from tailforge.eval.entropy import evaluate_entropy

    print_report(evaluate_entropy(args.classifier, args.dataset, args.split, args.device), args.json)
    return 0


def density_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard set folder (gen baseline / gen lowdensity output)")
    parser.add_argument("--dataset", required=True, help="dataset spec of the real data, e.g. digits")
    parser.add_argument("--classifier", required=True, help="evaluation classifier folder (tailforge train classifier)")
    add_json_option(parser)


def run_density(args: argparse.Namespace) -> int:
    """Measure a shard set in the embedding space of an evaluation classifier (one that did not guide the
    samples; refused if it did): hardness (Sehwag et al. 2022, Eq. 3, class Gaussians of the real training
    split), AvgkNN (mean distance to the k nearest real training images), LOF (scikit-learn, novelty=True), k-NN
    manifold precision/recall (Kynkaanniemi et al. 2019) and the fraction the classifier assigns to the
    generated class; the real test split is measured the same way as a reference, and out-of-fold percentiles of
    the training split's own hardness are reported."""

    from tailforge.eval.config import DensityConfig
    from tailforge.eval.density import evaluate_density

    print_report(evaluate_density(args.shards, args.dataset, args.classifier, config_from_args(DensityConfig, args)),
                 args.json)
    return 0


SUMMARY = "evaluate classifiers and shard sets"

COMMANDS = [
    Command(
        "accuracy", "top-1, per-class accuracy and ECE of a classifier on a dataset", run=run_accuracy,
        options=accuracy_options),
    Command(
        "corruptions", "CIFAR-10-C corruptions at 5 severities: mean corruption accuracy", run=run_corruptions,
        config="tailforge.eval.config:CorruptionSuiteConfig", flags={"corruptions": CORRUPTION_NAMES},
        options=corruptions_options),
    Command(
        "ood", "OOD detection: MSP, energy, MaxLogit, ReAct, ASH, SCALE, Mahalanobis, kNN", run=run_ood,
        config="tailforge.eval.config:OODConfig", options=ood_options),
    Command(
        "fidelity", "Frechet distance in classifier features and real-vs-synthetic fake detection", run=run_fidelity,
        config="tailforge.eval.config:FidelityConfig", options=fidelity_options),
    Command(
        "reconstruction", "FD, precision/recall, fake detection and PCA of reconstructed sets vs t_re "
        "(Yamaguchi & Fukuda 2023)", run=run_reconstruction, config="tailforge.eval.config:ReconstructionStudyConfig",
        options=reconstruction_options),
    Command(
        "memorization", "ratio-criterion memorization of a shard set or model against its training data",
        run=run_memorization, config="tailforge.eval.config:MemorizationConfig", options=memorization_options),
    Command(
        "emm", "effective model memorization over nested training subsets (Gu et al.)", run=run_emm,
        config="tailforge.eval.config:EMMConfig", options=emm_options,
        flags={"sizes": Flag(parse=training_set_sizes, show=lambda sizes: ",".join(str(n or "full") for n in sizes))}),
    Command(
        "emm-study", "memorization findings over several seeds: size, dummy data, random / unique labels, "
        "a minority class (Gu et al.; Yoon et al.)", run=run_emm_study, config="tailforge.eval.config:EMMStudyConfig",
        options=emm_options,
        flags={"sizes": Flag(parse=training_set_sizes, show=lambda sizes: ",".join(str(n or "full") for n in sizes))}),
    Command(
        "report", "gather evaluation results into report.json and a self-contained report.html", run=run_report,
        options=report_options),
    Command(
        "entropy", "mean output entropy of a classifier on datasets (Yamaguchi & Fukuda, Eq. 4, Fig. 5)",
        run=run_entropy, options=entropy_options),
    Command(
        "density", "hardness, AvgkNN, LOF, precision/recall of a shard set (Sehwag et al. 2022, Sec. 4.2)",
        run=run_density, config="tailforge.eval.config:DensityConfig", options=density_options),
]
