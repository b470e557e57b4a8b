"""`tailforge demo`: the embedded default, the whole pipeline (tailforge.demo) from one command."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from tailforge.cli.commands import Command, add_ray_options, print_json
from tailforge.cli.eval import CORRUPTION_NAMES
from tailforge.cli.flags import Flag, config_from_args
from tailforge.cli.gen import GUIDANCE_FLAGS, SAMPLING_FLAGS

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
800k steps its schedule (Sehwag et al. sample with 250 DDPM steps); --label-dropout 0.1 gives the
one model the null class that DiffAug and DiffAug-Ensemble denoise with (Sastry et al. used separate
unconditional models); --num-samples 50000 matches
the training-set size of Sehwag et al.'s experiments; --actors is the number of generation actors (one
per GPU by default when unset on GPU nodes), --diffaug-actors the AugmentActors serving DiffAug to
the trainer; --corruptions all --severities 1,2,3,4,5 runs the full CIFAR-10-C suite at 32 px. Each stage is cached in
--out, so a resubmitted job continues where the last one stopped (--out must be on storage every
node sees for the shard sets: a shared filesystem or an s3:// URL).
"""


def demo_options(parser: argparse.ArgumentParser) -> None:
    add_ray_options(parser, actors=False)  # --actors is DemoConfig.actors


def run_demo(args: argparse.Namespace) -> int:
    """Run the project's main job end to end on a local Ray instance (or --address): train a diffusion model
    with label dropout (class-conditional, and unconditional through its null class), an independent evaluation
    classifier and the guidance nets of Sehwag et al. 2022; generate baseline, low-density (alpha = beta = 0.5)
    and reconstructed (t_re) shard sets on the actor pool; train one classifier architecture on real data, real
    + baseline, real + low-density, real + reconstructed and real with DiffAug on the fly (same seed, epochs and
    steps); evaluate accuracy, corruptions, OOD and DiffAug-Ensemble, and the shard sets' density, fidelity and
    memorization; write OUT/report/report.html and report.json (led by the papers' findings this run reproduced
    or not) and OUT/summary.json. Every stage is cached in --out: a second run reuses what is there. Defaults
    fit scikit-learn's bundled digits on a 2-core CPU."""

    from tailforge.config import DemoConfig
    from tailforge.demo import run_demo as demo

    # stdout carries the result only (docs/formats.md, "Output"): the stage lines and the readable summary
    # are for people and go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        summary = demo(config_from_args(DemoConfig, args), address=args.address)
    print_json({"report": summary["report"], "summary": str(Path(summary["report"]).parents[1] / "summary.json"),
                "findings": summary["findings"], "classifiers": summary["classifiers"]})
    return 0


COMMAND = Command(
    "demo", "the embedded default: the whole pipeline on digits on this machine", run=run_demo,
    config="tailforge.config:DemoConfig", options=demo_options, epilog=DEMO_EPILOG,
    flags={**SAMPLING_FLAGS, **GUIDANCE_FLAGS, "steps": Flag("sampling-steps"), "corruptions": CORRUPTION_NAMES})
