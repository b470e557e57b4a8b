"""`tailforge train ...`: diffusion models and classifiers."""

from __future__ import annotations

import argparse

from tailforge.cli.util import add_command, add_group, non_negative_int, positive_float, positive_int, print_json
from tailforge.gen.diffusion.schedules import BETA_SCHEDULES
from tailforge.gen.models.unet import UNET_PRESETS


def run_diffusion(args: argparse.Namespace) -> int:
    from tailforge.train.diffusion import DiffusionTrainConfig, train_diffusion

    config = DiffusionTrainConfig(dataset=args.dataset, preset=args.preset, beta_schedule=args.schedule,
                                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every,
                                  class_conditional=not args.unconditional, label_dropout=args.label_dropout)
    out = train_diffusion(config, args.out, device=args.device, progress=not args.quiet)
    print_json({"model": str(out)})
    return 0


def run_classifier(args: argparse.Namespace) -> int:
    from tailforge.gen.core.errors import ConfigError
    from tailforge.train.classifier import ClassifierTrainConfig, train_classifier
    from tailforge.train.streams import parse_mix

    shards = {}
    for item in args.shards or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--shards {item!r} is not NAME=PATH")
        shards[name] = path
    config = ClassifierTrainConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        schedule=args.schedule, warmup=args.warmup, step_epochs=args.step_epochs, gamma=args.gamma,
        label_smoothing=args.label_smoothing, amp=not args.no_amp, mix=parse_mix(args.mix, shards),
        resample=not args.exact_epochs, epoch_samples=args.epoch_samples, shuffle_buffer=args.shuffle_buffer,
        loader_workers=args.loader_workers, workers=args.workers, follow=args.follow,
        follow_timeout=args.follow_timeout, diffaug=args.diffaug or "", diffaug_actors=args.diffaug_actors,
        checkpoint_every=args.checkpoint_every, seed=args.seed)
    _, accuracy = train_classifier(config, args.out, device=args.device, progress=not args.quiet, address=args.address)
    print_json({"classifier": args.out, "test_accuracy": round(accuracy, 4)})
    return 0


def run_guidance(args: argparse.Namespace) -> int:
    from tailforge.gen.diffusion.samplers import SamplingConfig
    from tailforge.train.guidance import GuidanceTrainConfig, train_guidance

    config = GuidanceTrainConfig(dataset=args.dataset, model=args.model, input=args.input, classifier=args.classifier,
                                 discriminator=args.discriminator, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, shrinkage=args.shrinkage, levels=args.levels,
                                 synthetic=SamplingConfig(sampler=args.sampler, steps=args.steps),
                                 synthetic_shards=args.synthetic_shards or "", seed=args.seed)
    info = train_guidance(config, args.out, device=args.device, progress=not args.quiet)
    print_json({"guidance": args.out, **{k: info[k] for k in ("input", "guidance_hash", "classifier_test_accuracy",
                                                               "discriminator_holdout_accuracy")}})
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
    diffusion.add_argument("--label-dropout", type=float, default=0.0,
                           help="replace each training label by a null class with this probability (classifier-free "
                                "guidance's p_uncond, 0.1-0.2): one model that generates by class and also denoises "
                                "without labels for DiffAug / DiffAug-Ensemble")
    diffusion.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    diffusion.add_argument("--seed", type=non_negative_int, default=0, help="initialisation and batch seed")
    diffusion.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    diffusion.add_argument("--quiet", action="store_true", help="no progress bar")

    classifier = add_command(
        group, "classifier", "train a timm classifier on streamed real + synthetic shards", run_classifier,
        description="Train any timm model (tinycnn / tinycnn_wide for 8x8 images and resnet18_cifar, a CIFAR-stem "
                    "ResNet-18 for 32x32, are registered here) on the dataset's training split, written once to "
                    "WebDataset shards under OUT/data/real, mixed with synthetic shard sets from `tailforge gen ...` "
                    "(--mix real=1.0,lowdensity=0.3 --shards lowdensity=DIR). Each epoch is logged to "
                    "OUT/train_log.jsonl (loss, accuracy, observed mix, test accuracy) and checkpointed to "
                    "OUT/checkpoints (safetensors + JSON); re-running the same command resumes from the newest "
                    "checkpoint with its optimizer state. --workers N > 1 runs N DDP ranks on Ray Train. Writes "
                    "classifier.safetensors + classifier.json and prints the test accuracy.")
    classifier.add_argument("--dataset", default="digits", help="dataset spec (see `train diffusion --help`)")
    classifier.add_argument("--out", required=True, help="classifier folder to write")
    classifier.add_argument("--model", default="tinycnn", help="any timm model name")
    classifier.add_argument("--mix", default="real=1.0",
                            help="sources and relative sampling weights: `real` (the dataset) and shard sets, named "
                                 "by --shards or given as folders, e.g. real=1.0,lowdensity=0.3")
    classifier.add_argument("--shards", action="append", metavar="NAME=PATH",
                            help="a synthetic shard set used in --mix under NAME (repeatable)")
    classifier.add_argument("--epochs", type=positive_int, default=30, help="epochs")
    classifier.add_argument("--epoch-samples", type=non_negative_int, default=0,
                            help="samples per epoch (resampled epochs); 0: one pass over the real data in expectation")
    classifier.add_argument("--exact-epochs", action="store_true",
                            help="every sample of every source once per epoch instead of resampled shards "
                                 "(mix weights must then be 1)")
    classifier.add_argument("--batch-size", type=positive_int, default=128, help="images per step over all workers")
    classifier.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer (SGD: Nesterov)")
    classifier.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    classifier.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    classifier.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay")
    classifier.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                            help="learning-rate schedule after warmup: cosine to 0, or times --gamma every --step-epochs")
    classifier.add_argument("--warmup", type=float, default=0.15, help="fraction of all steps in linear warmup")
    classifier.add_argument("--step-epochs", type=positive_int, default=10, help="step schedule: epochs between decays")
    classifier.add_argument("--gamma", type=positive_float, default=0.1, help="step schedule: decay factor")
    classifier.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    classifier.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA")
    classifier.add_argument("--loader-workers", type=non_negative_int, default=1,
                            help="DataLoader processes per rank reading shards (0: in the training process)")
    classifier.add_argument("--shuffle-buffer", type=positive_int, default=1000, help="shuffle buffer per reader")
    classifier.add_argument("--workers", type=positive_int, default=1,
                            help="Ray Train workers (DDP ranks); 1 trains in this process")
    classifier.add_argument("--address", default=None,
                            help="Ray cluster for --workers > 1 (default: $RAY_ADDRESS, else a local instance)")
    classifier.add_argument("--follow", action="store_true",
                            help="read the synthetic shard sets while their generation job still writes them, "
                                 "adding each shard as soon as its record lands in DIR/_records")
    classifier.add_argument("--follow-timeout", type=positive_float, default=600.0,
                            help="--follow: seconds to wait for a set's first shard")
    classifier.add_argument("--diffaug", default=None, metavar="MODEL_DIR",
                            help="train with DiffAug batches from this diffusion model (loss = CE(clean) + CE(augmented))")
    classifier.add_argument("--diffaug-actors", type=non_negative_int, default=0,
                            help="serve DiffAug from this many Ray actors (0: in the training process)")
    classifier.add_argument("--checkpoint-every", type=positive_int, default=1, help="epochs between checkpoints")
    classifier.add_argument("--seed", type=non_negative_int, default=0, help="initialisation and data-order seed")
    classifier.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    classifier.add_argument("--quiet", action="store_true", help="no progress bar")

    guidance = add_command(
        group, "guidance", "train the low-density guidance models of seed 000 (classifier + discriminator)",
        run_guidance,
        description="Train (1) an embedding classifier on the real training split and fit one Gaussian per class of "
                    "its embeddings (hardness, seed 000 Eq. 3; Ledoit-Wolf shrinkage where the sample covariance is "
                    "singular), and (2) a real-vs-synthetic discriminator on the real training split and an equal "
                    "number of baseline samples of --model, with its own class Gaussians (Eq. 6). --input fixes what "
                    "both see while sampling: x0 (the denoised estimate x0_hat; plain classifiers) or xt (the noisy "
                    "x_t; timestep-aware classifiers, Gaussians per noise level). Everything is saved in --out, "
                    "which `tailforge gen lowdensity --guidance` reads.")
    guidance.add_argument("--dataset", default="digits", help="dataset spec whose training split is the real data")
    guidance.add_argument("--model", required=True, help="diffusion model folder (its samples are the synthetic class)")
    guidance.add_argument("--out", required=True, help="guidance folder to write")
    guidance.add_argument("--input", choices=("x0", "xt"), default="x0",
                          help="what the guidance nets see at each step: x0_hat (x0) or the noisy x_t (xt)")
    guidance.add_argument("--classifier", default="tinycnn", help="timm name of the embedding classifier")
    guidance.add_argument("--discriminator", default="tinycnn", help="timm name of the real-vs-synthetic discriminator")
    guidance.add_argument("--epochs", type=positive_int, default=30, help="passes over each network's training data")
    guidance.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    guidance.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW peak learning rate")
    guidance.add_argument("--shrinkage", choices=("auto", "ledoit_wolf", "none"), default="auto",
                          help="class covariances: sample covariance, Ledoit-Wolf where it is singular (auto); always "
                               "Ledoit-Wolf; or never")
    guidance.add_argument("--levels", type=positive_int, default=10,
                          help="--input xt: noise levels (evenly spaced timesteps) with their own class Gaussians")
    guidance.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                          help="sampler of the discriminator's synthetic (baseline) samples")
    guidance.add_argument("--steps", type=positive_int, default=250, help="its denoising steps (paper: 250 DDPM)")
    guidance.add_argument("--synthetic-shards", default=None,
                          help="read the synthetic samples from this shard set (e.g. `gen baseline` output) instead")
    guidance.add_argument("--seed", type=non_negative_int, default=0, help="initialisation, data order and noise seed")
    guidance.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    guidance.add_argument("--quiet", action="store_true", help="no progress bars")
