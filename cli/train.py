"""`tailforge train ...`: diffusion models, classifiers and the low-density guidance nets."""

from __future__ import annotations

import argparse
from typing import Callable

from tailforge.cli.commands import (
    Command,
    add_device_option,
    add_out_option,
    add_quiet_option,
    add_ray_options,
    name_value_pairs,
    print_json,
)
from tailforge.cli.flags import Flag, config_from_args
from tailforge.cli.gen import SAMPLING_FLAGS


def trainer_options(folder: str) -> Callable[[argparse.ArgumentParser], None]:
    """--out (the `folder` the trainer writes), --device, --quiet and --tensorboard."""

    def add(parser: argparse.ArgumentParser) -> None:
        add_out_option(parser, f"{folder} folder to write")
        add_device_option(parser)
        add_quiet_option(parser)
        parser.add_argument("--tensorboard", default=None, metavar="DIR",
                            help="also write every training-log entry (loss, accuracy, learning rate, samples/s) "
                                 "to TensorBoard event files in DIR; needs tensorboard or tensorboardX "
                                 "(pip install 'tailforge[tensorboard]')")

    return add


def run_diffusion(args: argparse.Namespace) -> int:
    """Train a class-conditional diffusers UNet2DModel on a dataset's training split. Image size, channels and
    classes come from the dataset. Checkpoints (safetensors) go to OUT/checkpoints; re-running the same command
    resumes from the newest one (a larger --steps extends the run). The EMA model is exported to OUT as a
    diffusers DDPMPipeline folder. Dataset specs: digits | mondrian | gm | ri | cifar10:PATH | imagefolder:PATH
    | shards:PATH, options as ?n=100&subset_seed=0."""

    from tailforge.train.config import DiffusionTrainConfig
    from tailforge.train.diffusion import train_diffusion
    from tailforge.train.run_folder import log_to_tensorboard

    with log_to_tensorboard(args.tensorboard):
        out = train_diffusion(config_from_args(DiffusionTrainConfig, args), args.out, device=args.device,
                              progress=not args.quiet)
    print_json({"model": str(out)})
    return 0


def classifier_options(parser: argparse.ArgumentParser) -> None:
    trainer_options("classifier")(parser)
    parser.add_argument("--mix", dest="mix_spec", default=None,
                        help="sources and relative sampling weights: `real` (the dataset) and shard sets, named "
                             "by --shards or given as folders, e.g. real=1.0,lowdensity=0.3 (default: real=1.0, "
                             "or the mix of --config)")
    parser.add_argument("--shards", action="append", metavar="NAME=PATH",
                        help="a synthetic shard set used in --mix under NAME (repeatable)")
    add_ray_options(parser, actors=False)


def classifier_config(args: argparse.Namespace):
    """The ClassifierTrainConfig of parsed arguments: --mix (with --shards) over a --config file's mix."""
    from tailforge.gen.core.errors import ConfigError
    from tailforge.train.config import ClassifierTrainConfig
    from tailforge.train.streams import parse_mix

    if args.shards and not args.mix_spec:
        raise ConfigError("--shards names sets for --mix to weight; give --mix too (e.g. real=1.0,NAME=0.3)")
    given = {"mix": parse_mix(args.mix_spec, name_value_pairs(args.shards, "--shards"))} if args.mix_spec else {}
    return config_from_args(ClassifierTrainConfig, args, **given)


def run_classifier(args: argparse.Namespace) -> int:
    """Train any timm model (tinycnn / tinycnn_wide for 8x8 images and resnet18_cifar, a CIFAR-stem ResNet-18
    for 32x32, are registered here) on the dataset's training split, written once to WebDataset shards under
    OUT/data/real, mixed with synthetic shard sets from `tailforge gen ...` (--mix real=1.0,lowdensity=0.3
    --shards lowdensity=DIR). Each epoch is logged to OUT/train_log.jsonl (loss, accuracy, observed mix, test
    accuracy) and checkpointed to OUT/checkpoints (safetensors + JSON); re-running the same command resumes from
    the newest checkpoint with its optimizer state. --workers N > 1 runs N DDP ranks on Ray Train (on the
    cluster --address names). Writes classifier.safetensors + classifier.json and prints the test accuracy."""

    from tailforge.train.classifier import train_classifier
    from tailforge.train.run_folder import log_to_tensorboard

    config = classifier_config(args)
    with log_to_tensorboard(args.tensorboard):
        _, accuracy = train_classifier(config, args.out, device=args.device, progress=not args.quiet,
                                       address=args.address)
    print_json({"classifier": args.out, "test_accuracy": round(accuracy, 4)})
    return 0


def run_guidance(args: argparse.Namespace) -> int:
    """Train (1) an embedding classifier on the real training split and fit one Gaussian per class of its
    embeddings (hardness, Sehwag et al. 2022 Eq. 3; Ledoit-Wolf shrinkage where the sample covariance is
    singular), and (2) a real-vs-synthetic discriminator on the real training split and an equal number of
    baseline samples of --model (drawn with --sampler / --steps), with its own class Gaussians (Eq. 6). --input
    fixes what both see while sampling: x0 (the denoised estimate x0_hat; plain classifiers), xt (the noisy
    x_t; timestep-aware classifiers, Gaussians per noise level) or xt+x0 (both at once: Sastry et al.'s
    denoise-augmented classifiers, whose gradient flows through the U-Net). Everything is saved in --out, which `tailforge
    gen lowdensity --guidance` reads."""

    from tailforge.train.config import GuidanceTrainConfig
    from tailforge.train.guidance import train_guidance
    from tailforge.train.run_folder import log_to_tensorboard

    with log_to_tensorboard(args.tensorboard):
        info = train_guidance(config_from_args(GuidanceTrainConfig, args), args.out, device=args.device,
                              progress=not args.quiet)
    print_json({"guidance": args.out, **{k: info[k] for k in ("input", "guidance_hash", "classifier_test_accuracy",
                                                               "discriminator_holdout_accuracy")}})
    return 0


SUMMARY = "train diffusion models and classifiers"

COMMANDS = [
    Command(
        "diffusion", "train a class-conditional DDPM (epsilon loss, AdamW, EMA)", run=run_diffusion,
        config="tailforge.train.config:DiffusionTrainConfig", options=trainer_options("model"),
        flags={"beta_schedule": Flag("schedule"), "class_conditional": Flag("unconditional")}),
    Command(
        "classifier", "train a timm classifier on streamed real + synthetic shards", run=run_classifier,
        config="tailforge.train.config:ClassifierTrainConfig", options=classifier_options,
        flags={"mix": None, "resample": Flag("exact-epochs")}),
    Command(
        "guidance", "train the low-density guidance models of Sehwag et al. 2022 (classifier + discriminator)",
        run=run_guidance, config="tailforge.train.config:GuidanceTrainConfig", options=trainer_options("guidance"),
        flags=SAMPLING_FLAGS),
]
