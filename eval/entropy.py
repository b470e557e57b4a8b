"""Output entropy of a classifier on a dataset (seed 001, Eq. 4 and Fig. 5).

H_theta(y) = -1/N sum_i sum_j p_theta(y = j | x_i) log p_theta(y = j | x_i), with p_theta the
softmax of the classifier's logits: the mean over the dataset of each prediction's entropy (nats).
Seed 001 measures it with the classifier trained on real data on reconstructed sets of growing
t_re: lower entropy means samples that are easier to classify, closer to the modes.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor


def output_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (nats) of softmax(logits), computed from log_softmax so that a
    probability that underflows to 0 contributes 0 (p log p -> 0) instead of NaN."""
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def mean_output_entropy(logits: Tensor) -> float:
    """Eq. 4 of seed 001: the mean of the per-sample entropies."""
    if len(logits) == 0:
        raise ValueError("output entropy of an empty dataset is undefined")
    return float(output_entropy(logits).mean())


def entropy_report(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Eq. 4 over the whole set and per true class, with the classifier's top-1 on the same set."""
    mean = mean_output_entropy(logits)
    per_sample = output_entropy(logits)
    per_class = [float(per_sample[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"n": int(len(labels)), "mean_entropy": mean,
            "per_class_mean_entropy": per_class,
            "top1": float((logits.argmax(1) == labels).float().mean()),
            "max_entropy": float(torch.log(torch.tensor(float(num_classes))))}


def run_cli(args: argparse.Namespace) -> int:
    from tailforge.cli.util import print_json
    from tailforge.gen.core.files import write_json_atomic
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.models.classifiers import load_classifier, predict_logits

    model, config = load_classifier(args.classifier, args.device or "cpu")
    report = {"classifier": args.classifier, "split": args.split, "datasets": {}}
    for spec in args.dataset:
        data = load_dataset(spec, args.split)
        report["datasets"][spec] = entropy_report(predict_logits(model, data.images), data.labels,
                                                  int(config["num_classes"]))
    if args.json:
        write_json_atomic(args.json, report)
    print_json(report)
    return 0


def register(group: argparse._SubParsersAction) -> None:
    from tailforge.cli.util import add_command

    parser = add_command(
        group, "entropy", "mean output entropy of a classifier on datasets (seed 001 Eq. 4, Fig. 5)", run_cli,
        description="Mean over a dataset of the entropy (nats) of the classifier's softmax output (seed 001 Eq. 4), "
                    "overall and per true class, with the classifier's top-1 on the same data. Seed 001 measures "
                    "the classifier trained on real data on reconstructed sets of growing t_re (tailforge gen "
                    "reconstruct): the entropy falls as the reverse process pulls samples towards the modes.")
    parser.add_argument("--classifier", required=True, help="classifier folder (tailforge train classifier)")
    parser.add_argument("--dataset", required=True, nargs="+", metavar="SPEC",
                        help="one or more dataset specs, e.g. shards:R/t_re_0 shards:R/t_re_0p3")
    parser.add_argument("--split", default="train", help="split to measure (shard sets have only 'train')")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
