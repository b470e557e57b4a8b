"""`tailforge train ...`: diffusion models and classifiers."""

from __future__ import annotations

import argparse

from ..gen.cliutil import add_command, add_group, non_negative_int, positive_float, positive_int, print_json
from ..gen.schedules import BETA_SCHEDULES
from ..gen.unet import UNET_PRESETS


def run_diffusion(args: argparse.Namespace) -> int:
    from .diffusion import DiffusionTrainConfig, train_diffusion

    config = DiffusionTrainConfig(dataset=args.dataset, preset=args.preset, beta_schedule=args.schedule,
                                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every,
                                  class_conditional=not args.unconditional)
    out = train_diffusion(config, args.out, device=args.device, progress=not args.quiet)
    print_json({"model": str(out)})
    return 0


def run_classifier(args: argparse.Namespace) -> int:
    from .classifier import ClassifierTrainConfig, train_classifier

    config = ClassifierTrainConfig(dataset=args.dataset, model=args.model, epochs=args.epochs,
                                   batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    _, accuracy = train_classifier(config, args.out, device=args.device, progress=not args.quiet)
    print_json({"classifier": args.out, "test_accuracy": round(accuracy, 4)})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "train", "train diffusion models and classifiers")
    diffusion = add_command(
        group, "diffusion", "train a class-conditional DDPM (epsilon loss, AdamW, EMA)", run_diffusion,
        description="Train a class-conditional diffusers UNet2DModel on a dataset's training split. Image size, "
                    "channels and classes come from the dataset. Checkpoints (safetensors) go to OUT/checkpoints; "
                    "re-running the same command resumes from the newest one (a larger --steps extends the run). "
                    "The EMA model is exported to OUT as a diffusers DDPMPipeline folder.")
    diffusion.add_argument("--dataset", default="digits",
                           help="dataset spec: digits | mondrian | gm | ri | cifar10:PATH | imagefolder:PATH | "
                                "shards:PATH, options as ?n=100&subset_seed=0")
    diffusion.add_argument("--out", required=True, help="model folder to write")
    diffusion.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps")
    diffusion.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    diffusion.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    diffusion.add_argument("--preset", choices=sorted(UNET_PRESETS), default=None,
                           help="U-Net size (default: tiny up to 16 px, small above)")
    diffusion.add_argument("--schedule", choices=sorted(BETA_SCHEDULES), default="linear", help="beta schedule, T = 1000")
    diffusion.add_argument("--unconditional", action="store_true", help="train without class labels")
    diffusion.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    diffusion.add_argument("--seed", type=non_negative_int, default=0, help="initialisation and batch seed")
    diffusion.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    diffusion.add_argument("--quiet", action="store_true", help="no progress bar")

    classifier = add_command(
        group, "classifier", "train a timm classifier on a dataset", run_classifier,
        description="Train any timm model (tinycnn and tinycnn_wide are registered for 8x8 images) on a dataset's "
                    "training split; reports test accuracy and saves classifier.safetensors + classifier.json.")
    classifier.add_argument("--dataset", default="digits", help="dataset spec (see `train diffusion --help`)")
    classifier.add_argument("--out", required=True, help="classifier folder to write")
    classifier.add_argument("--model", default="tinycnn", help="timm model name")
    classifier.add_argument("--epochs", type=positive_int, default=30, help="passes over the training split")
    classifier.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    classifier.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW peak learning rate")
    classifier.add_argument("--seed", type=non_negative_int, default=0, help="initialisation and data-order seed")
    classifier.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    classifier.add_argument("--quiet", action="store_true", help="no progress bar")
