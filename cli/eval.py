"""`tailforge eval ...` and `tailforge demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tailforge.cli.util import add_command, add_group, positive_int, print_json


def run_accuracy(args: argparse.Namespace) -> int:
    from tailforge.eval.accuracy import accuracy_report
    from tailforge.gen.data.datasets import load_dataset, with_option
    from tailforge.gen.models.classifiers import load_classifier, predict_logits

    model, config = load_classifier(args.classifier)
    spec = with_option(args.dataset, "skip_bad_shards", "1") if args.skip_bad_shards else args.dataset
    data = load_dataset(spec, args.split)
    report = {"classifier": args.classifier, "dataset": args.dataset, "split": args.split,
              **accuracy_report(predict_logits(model, data.images), data.labels, int(config["num_classes"]))}
    if data.read_report:
        report["shard_read"] = data.read_report  # shards read and skipped (--skip-bad-shards)
    if args.diffaug_ensemble:  # the same classifier with and without DiffAug-Ensemble (seed 003)
        from tailforge.eval.features import wrap_diffaug_ensemble

        ensemble = wrap_diffaug_ensemble(model, args.diffaug_ensemble)
        report["diffaug_ensemble"] = {"model": args.diffaug_ensemble, **accuracy_report(
            predict_logits(ensemble, data.images), data.labels, int(config["num_classes"]))}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_json(report)
    return 0


def run_density(args: argparse.Namespace) -> int:
    from tailforge.eval.density import DensityConfig, evaluate_density
    from tailforge.gen.core.files import write_json_atomic

    config = DensityConfig(k=args.k, lof_neighbors=args.lof_neighbors, pr_k=args.pr_k, shrinkage=args.shrinkage,
                           folds=args.folds)
    report = evaluate_density(args.shards, args.dataset, args.classifier, config)
    if args.json:
        write_json_atomic(args.json, report)
    print_json(report)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from tailforge.demo import DemoConfig
    from tailforge.demo import run_demo as demo
    from tailforge.gen.diffusion.samplers import SamplingConfig
    from tailforge.gen.methods.lowdensity import GuidanceConfig

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    settings["sampling"] = SamplingConfig(sampler=args.sampler, steps=args.sampling_steps)
    settings["guide"] = GuidanceConfig(alpha=args.alpha, beta=args.beta)
    settings["guide"].validate()
    demo(DemoConfig(**settings), address=args.address)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from tailforge.bench import register as register_bench

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
    from tailforge.eval import corruptions, emm, entropy, fidelity, memorization, ood, report

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

    register_demo(sub)
    register_bench(sub)


DEMO_EPILOG = """\
The same study on CIFAR-10 on a GPU cluster
-------------------------------------------
CIFAR-10 in torchvision's on-disk format (cifar-10-batches-py) must be at the same local path on
every node (or use shards:s3://... after converting it); nothing is downloaded. Start the cluster
(cluster.yaml, or `ray start --head` plus `ray start --address HEAD:6379` on each GPU node), then
from this checkout:

  ray job submit --address http://HEAD:8265 --working-dir . -- \\
    tailforge demo --out /shared/demo-cifar10 \\
      --dataset cifar10:/data/cifar-10-batches-py \\
      --unet-preset ddpm-cifar10 --diffusion-steps 800000 --label-dropout 0.1 \\
      --diffusion-batch-size 128 --num-samples 50000 --sampler ddpm --sampling-steps 250 \\
      --guidance-epochs 30 --classifier resnet18_cifar --classifier-epochs 100 \\
      --reference-classifier resnet18_cifar --reference-epochs 100 \\
      --corruptions all --severities 1,2,3,4,5 --corruption-reference-size 32 --t-re 0.3 \\
      --actors 8 --diffaug-actors 4

What to change and why: --unet-preset ddpm-cifar10 is the DDPM paper's 35.7M-parameter net and
800k steps its schedule (seed 000 uses 250 DDPM steps for sampling); --label-dropout 0.1 gives the
one model the null class that DiffAug and DiffAug-Ensemble denoise with (seed 003 used separate
unconditional models); --num-samples 50000 matches
the training-set size of seed 000's experiments; --actors is the number of generation actors (one
per GPU by default when unset on GPU nodes), --diffaug-actors the AugmentActors serving DiffAug to
the trainer; --corruptions all --severities 1,2,3,4,5 runs the full CIFAR-10-C suite at 32 px. Each stage is cached in
--out, so a resubmitted job continues where the last one stopped (--out must be on storage every
node sees for the shard sets: a shared filesystem or an s3:// URL).
"""


def register_demo(sub: argparse._SubParsersAction) -> None:
    from tailforge.cli.util import add_ray_options
    from tailforge.demo import DemoConfig
    from tailforge.gen.diffusion.samplers import SAMPLERS

    defaults = DemoConfig()
    demo = sub.add_parser(
        "demo", help="the embedded default: the whole pipeline on digits on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEMO_EPILOG,
        description="Run the project's main job end to end on a local Ray instance (or --address): train a "
                    "diffusion model with label dropout (class-conditional, and unconditional through its null "
                    "class), an independent evaluation classifier "
                    "and seed 000's guidance nets; generate baseline, low-density (alpha = beta = 0.5) and "
                    "reconstructed (t_re) shard sets on the actor pool; train one classifier architecture on real "
                    "data, real + baseline, real + low-density, real + reconstructed and real with DiffAug on the "
                    "fly (same seed, epochs and steps); evaluate accuracy, corruptions, OOD and DiffAug-Ensemble, "
                    "and the shard sets' density, fidelity and memorization; write OUT/report/report.html and "
                    "report.json (led by the papers' findings this run reproduced or not) and OUT/summary.json. "
                    "Every stage is cached in --out: a second run reuses what is there. Defaults fit scikit-learn's "
                    "bundled digits on a 2-core CPU.")
    demo.set_defaults(run=run_demo)
    add = demo.add_argument
    add("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    add("--dataset", default=defaults.dataset, help="dataset spec (default: digits)")
    add("--diffusion-steps", type=positive_int, default=defaults.diffusion_steps,
        help=f"the diffusion model's training steps (default: {defaults.diffusion_steps})")
    add("--label-dropout", type=float, default=defaults.label_dropout,
        help="probability a training label is replaced by the null class, which DiffAug and DiffAug-Ensemble use "
             f"(default: {defaults.label_dropout}; Ho & Salimans 2022 use 0.1-0.2)")
    add("--unet-preset", default=None, help="U-Net preset (default: tiny for <= 16 px, small above)")
    add("--diffusion-batch-size", type=positive_int, default=defaults.diffusion_batch_size,
        help=f"diffusion training batch (default: {defaults.diffusion_batch_size})")
    add("--num-samples", type=positive_int, default=defaults.num_samples,
        help=f"baseline and low-density samples each (default: {defaults.num_samples})")
    add("--sampler", choices=sorted(SAMPLERS), default=defaults.sampling.sampler,
        help=f"sampler of every generation job (default: {defaults.sampling.sampler})")
    add("--sampling-steps", type=positive_int, default=defaults.sampling.steps,
        help=f"its steps (default: {defaults.sampling.steps})")
    add("--alpha", type=float, default=defaults.guide.alpha, help="low-density hardness scale (default: 0.5, seed 000)")
    add("--beta", type=float, default=defaults.guide.beta, help="low-density fidelity scale (default: 0.5, seed 000)")
    add("--guidance-epochs", type=positive_int, default=defaults.guidance_epochs,
        help=f"guidance nets' epochs (default: {defaults.guidance_epochs})")
    add("--t-re", type=float, default=defaults.t_re, help=f"reconstruction's t_re, a fraction of T (default: {defaults.t_re})")
    add("--classifier", default=defaults.classifier,
        help=f"architecture of the compared classifiers, any timm name (default: {defaults.classifier})")
    add("--classifier-epochs", type=positive_int, default=defaults.classifier_epochs,
        help=f"their epochs (default: {defaults.classifier_epochs})")
    add("--synthetic-weight", type=float, default=defaults.synthetic_weight,
        help=f"sampling weight of a synthetic set next to real = 1 (default: {defaults.synthetic_weight})")
    add("--reference-classifier", default=defaults.reference_classifier,
        help=f"independent evaluation classifier (default: {defaults.reference_classifier})")
    add("--reference-epochs", type=positive_int, default=defaults.reference_epochs,
        help=f"its epochs (default: {defaults.reference_epochs})")
    add("--corruptions", type=lambda text: tuple() if text == "all" else tuple(text.split(",")),
        default=defaults.corruptions, help=f"comma-separated corruptions, or all (default: {','.join(defaults.corruptions)})")
    add("--severities", type=lambda text: tuple(int(v) for v in text.split(",")), default=defaults.severities,
        help=f"comma-separated corruption severities (default: {','.join(map(str, defaults.severities))})")
    add("--corruption-reference-size", type=positive_int, default=defaults.corruption_reference_size,
        help="image size CIFAR-10-C's pixel parameters are stated for; 8 applies them unscaled to 8 px digits "
             "(default: 8)")
    add("--diffaug-actors", type=int, default=defaults.diffaug_actors,
        help="serve DiffAug from this many AugmentActors (default: 0, in the training process)")
    add("--seed", type=int, default=defaults.seed, help="seed of every job and trainer (default: 0)")
    add_ray_options(demo)
