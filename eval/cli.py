"""`tailforge eval ...` and `tailforge demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..gen.cliutil import add_command, add_group, positive_int, print_json


def run_accuracy(args: argparse.Namespace) -> int:
    from ..gen.classifier_nets import load_classifier, predict_logits
    from ..gen.datasets import load_dataset, with_option
    from .accuracy import accuracy_report

    model, config = load_classifier(args.classifier)
    spec = with_option(args.dataset, "skip_bad_shards", "1") if args.skip_bad_shards else args.dataset
    data = load_dataset(spec, args.split)
    report = {"classifier": args.classifier, "dataset": args.dataset, "split": args.split,
              **accuracy_report(predict_logits(model, data.images), data.labels, int(config["num_classes"]))}
    if data.read_report:
        report["shard_read"] = data.read_report  # shards read and skipped (--skip-bad-shards)
    if args.diffaug_ensemble:  # the same classifier with and without DiffAug-Ensemble (seed 003)
        from .features import wrap_diffaug_ensemble

        ensemble = wrap_diffaug_ensemble(model, args.diffaug_ensemble)
        report["diffaug_ensemble"] = {"model": args.diffaug_ensemble, **accuracy_report(
            predict_logits(ensemble, data.images), data.labels, int(config["num_classes"]))}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_json(report)
    return 0


def run_density(args: argparse.Namespace) -> int:
    from ..gen.checkpoint import write_json_atomic
    from .density import DensityConfig, evaluate_density

    config = DensityConfig(k=args.k, lof_neighbors=args.lof_neighbors, pr_k=args.pr_k, shrinkage=args.shrinkage,
                           folds=args.folds)
    report = evaluate_density(args.shards, args.dataset, args.classifier, config)
    if args.json:
        write_json_atomic(args.json, report)
    print_json(report)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo as demo

    demo(DemoConfig(out=args.out, diffusion_steps=args.diffusion_steps, num_samples=args.num_samples,
                    actors=args.actors))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .bench import register as register_bench

    group = add_group(sub, "eval", "evaluate classifiers and shard sets")
    accuracy = add_command(
        group, "accuracy", "top-1, per-class accuracy and ECE of a classifier on a dataset", run_accuracy,
        description="Classify a dataset split with a saved classifier. On a shard set (shards:PATH) the labels are "
                    "the classes the samples were generated for, so top-1 is the fraction of samples an "
                    "independent classifier assigns to their requested class.")
    accuracy.add_argument("--classifier", required=True, help="classifier folder (tailforge train classifier)")
    accuracy.add_argument("--dataset", required=True, help="dataset spec, e.g. digits or shards:OUT")
    accuracy.add_argument("--split", default="test", help="split to evaluate (shard sets have only 'train')")
    accuracy.add_argument("--json", default=None, help="also write the report to this file")
    accuracy.add_argument("--diffaug-ensemble", default=None, metavar="MODEL_DIR",
                          help="also evaluate DiffAug-Ensemble of the classifier with this (unconditional) diffusion "
                               "model: mean softmax over t in {0, 50, ..., 450} (seed 003)")
    accuracy.add_argument("--skip-bad-shards", action="store_true",
                          help="shards: datasets: skip damaged shards (logged, counted in the report's shard_read) "
                               "instead of stopping at the first one")
    from . import corruptions, emm, entropy, fidelity, memorization, ood, report

    for suite in (corruptions, ood, fidelity, memorization, emm, report, entropy):
        suite.register(group)

    density = add_command(
        group, "density", "hardness, AvgkNN, LOF, precision/recall of a shard set (seed 000 Sec. 4.2)", run_density,
        description="Measure a shard set in the embedding space of an evaluation classifier (one that did not guide "
                    "the samples; refused if it did): hardness (seed 000 Eq. 3, class Gaussians of the real training "
                    "split), AvgkNN (mean distance to the k nearest real training images), LOF (scikit-learn, "
                    "novelty=True), k-NN manifold precision/recall (Kynkaanniemi et al. 2019) and the fraction the "
                    "classifier assigns to the generated class; the real test split is measured the same way as a "
                    "reference, and out-of-fold percentiles of the training split's own hardness are reported.")
    density.add_argument("--shards", required=True, help="shard set folder (gen baseline / gen lowdensity output)")
    density.add_argument("--dataset", required=True, help="dataset spec of the real data, e.g. digits")
    density.add_argument("--classifier", required=True, help="evaluation classifier folder (tailforge train classifier)")
    density.add_argument("--k", type=positive_int, default=5, help="AvgkNN neighbours (seed 000: 5)")
    density.add_argument("--lof-neighbors", type=positive_int, default=20, help="LOF neighbourhood size")
    density.add_argument("--pr-k", type=positive_int, default=3, help="k of the precision/recall k-NN manifolds")
    density.add_argument("--shrinkage", choices=("auto", "ledoit_wolf", "none"), default="ledoit_wolf",
                         help="class covariances of the evaluation features")
    density.add_argument("--folds", type=positive_int, default=5, help="cross-fitting folds for the training hardness")
    density.add_argument("--json", default=None, help="also write the report to this file")

    from .demo import DemoConfig

    defaults = DemoConfig()
    demo = sub.add_parser(
        "demo", help="the embedded default: the whole pipeline on digits on this machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a tiny class-conditional diffusion model on scikit-learn's bundled digits, generate "
                    "baseline shards on a local Ray actor pool, and check them with an independently trained "
                    "classifier. Results and models are cached in --out, so a second run reuses them.")
    demo.set_defaults(run=run_demo)
    demo.add_argument("--out", default=defaults.out, help="output folder")
    demo.add_argument("--diffusion-steps", type=int, default=defaults.diffusion_steps, help="diffusion training steps")
    demo.add_argument("--num-samples", type=int, default=defaults.num_samples, help="baseline samples to generate")
    demo.add_argument("--actors", type=int, default=defaults.actors, help="Ray actors for generation")
    register_bench(sub)
