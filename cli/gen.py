"""`tailforge gen ...`: generation jobs that write WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from tailforge.cli.util import add_command, add_group, add_ray_options, non_negative_int, positive_int, print_json
from tailforge.gen.diffusion.samplers import SAMPLERS, SamplingConfig
from tailforge.gen.jobs.runner import model_manifest
from tailforge.gen.jobs.sources import BaselineConfig, BaselineSource


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm",
                        help="ddpm (ancestral, the papers' baseline), ddim (eta), euler / heun (Karras ODE)")
    parser.add_argument("--steps", type=positive_int, default=250, help="denoising steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 equals DDPM")
    parser.add_argument("--no-clip", action="store_true", help="do not clamp x0_hat to [-1, 1] during sampling")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(sampler=args.sampler, steps=args.steps, eta=args.eta, clip_denoised=not args.no_clip)


def add_job_options(parser: argparse.ArgumentParser, job: str) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards, records and _info.json")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="job seed; sample i's noise comes from (seed, i)")
    parser.add_argument("--job", default=job, help="job name: prefix of shard files and sample keys")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="samples per denoiser batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_options(parser)


def run_baseline(args: argparse.Namespace) -> int:
    from tailforge.gen.jobs.runner import run_config_job

    config = BaselineConfig(model=args.model, num=args.num, sampling=sampling_config(args), seed=args.seed,
                            job=args.job, shard_size=args.shard_size, batch_size=args.batch_size)
    records = run_config_job(args.out, config, BaselineSource, config.num, actors=args.actors, address=args.address,
                             manifest_extra=model_manifest(args.model), progress=not args.quiet)
    print_json({"out": args.out, "shards": len(records), "samples": sum(r.count for r in records),
                "seconds": round(sum(r.seconds for r in records), 2)})
    return 0


def fraction_list(text: str) -> list[float]:
    """A comma-separated list of fractions in [0, 1] (reconstruction's t_re values)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every t_re must be a fraction of T in [0, 1], got {text!r}")
    return values


def run_reconstruct(args: argparse.Namespace) -> int:
    from tailforge.gen.data.datasets import load_dataset
    from tailforge.gen.jobs.runner import run_config_job
    from tailforge.gen.jobs.sources import ReconstructConfig, ReconstructSource, shard_set_name

    extra = model_manifest(args.model)
    num = len(load_dataset(args.dataset, args.split))
    outputs = {}
    for t_re in args.t_re:
        name = shard_set_name(t_re)
        config = ReconstructConfig(model=args.model, dataset=args.dataset, t_re=t_re, split=args.split,
                                   sampling=sampling_config(args), seed=args.seed, job=f"{args.job}_{name}",
                                   shard_size=args.shard_size, batch_size=args.batch_size)
        out = str(Path(args.out) / name)
        records = run_config_job(out, config, ReconstructSource, num, actors=args.actors, address=args.address,
                                 progress=not args.quiet, manifest_extra={**extra, "t_re": t_re,
                                                                          "source_dataset": args.dataset,
                                                                          "source_split": args.split})
        outputs[name] = {"out": out, "t_re": t_re, "samples": sum(r.count for r in records),
                         "seconds": round(sum(r.seconds for r in records), 2)}
    print_json(outputs)
    return 0


def run_lowdensity(args: argparse.Namespace) -> int:
    from tailforge.gen.jobs.runner import run_config_job
    from tailforge.gen.jobs.sources import LowDensityConfig, LowDensitySource
    from tailforge.gen.methods.lowdensity import GuidanceConfig

    # Options left out keep GuidanceConfig's defaults (the paper's alpha = beta = 0.5).
    guide = GuidanceConfig(**{k: getattr(args, k) for k in ("alpha", "beta", "tau", "loss") if hasattr(args, k)})
    guide.validate()
    config = LowDensityConfig(model=args.model, guidance=args.guidance, num=args.num, sampling=sampling_config(args),
                              guide=guide, seed=args.seed, job=args.job, shard_size=args.shard_size,
                              batch_size=args.batch_size)
    records = run_config_job(args.out, config, LowDensitySource, config.num, actors=args.actors, address=args.address,
                             manifest_extra=model_manifest(args.model), progress=not args.quiet)
    print_json({"out": args.out, "shards": len(records), "samples": sum(r.count for r in records),
                "seconds": round(sum(r.seconds for r in records), 2)})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "gen", "generate WebDataset shards with a diffusion model on a Ray actor pool")
    baseline = add_command(
        group, "baseline", "plain class-conditional sampling into shards", run_baseline,
        description="Sample --num images (class-balanced labels: sample i gets class i mod C) and write them as "
                    "WebDataset shards with a timm _info.json. Re-running the same command skips shards that "
                    "are already recorded.")
    baseline.add_argument("--model", required=True, help="diffusion model folder (tailforge train diffusion, or diffusers)")
    baseline.add_argument("--num", type=positive_int, required=True, help="number of samples")
    add_sampling_options(baseline)
    add_job_options(baseline, "baseline")

    reconstruct = add_command(
        group, "reconstruct", "real-sample reconstruction (seed 001 Algorithm 1): diffuse to t_re, reverse back",
        run_reconstruct,
        description="Diffuse every image of a dataset split forward to t_re (a fraction of the model's T) and run the "
                    "reverse process back to 0 on a Ray actor pool, writing one shard set per t_re to "
                    "OUT/t_re_<value> (t_re 0.3 goes to OUT/t_re_0p3, read as shards:OUT/t_re_0p3). Labels are the "
                    "source labels; each sample's json names its source key and t_re. t_re = 0 copies the real "
                    "images, t_re = 1 is full class-conditional generation. --steps is the full chain's step count; "
                    "the chain from t_re runs round(steps * t_re) of them. Re-running the same command skips shards "
                    "that are already recorded.")
    reconstruct.add_argument("--model", required=True, help="diffusion model folder (tailforge train diffusion, or diffusers)")
    reconstruct.add_argument("--dataset", required=True, help="dataset spec whose images are reconstructed, e.g. digits")
    reconstruct.add_argument("--split", default="train", help="dataset split to reconstruct")
    reconstruct.add_argument("--t-re", type=fraction_list, default="0.3,0.5,0.7,1.0",
                             help="comma-separated reverse steps as fractions of T, one shard set each")
    add_sampling_options(reconstruct)
    add_job_options(reconstruct, "reconstruct")

    lowdensity = add_command(
        group, "lowdensity", "low-density sampling with alpha/beta guidance (seed 000 Algorithm 1) into shards",
        run_lowdensity,
        description="Sample --num class-balanced images like `gen baseline` (same seeds, same noise) with the "
                    "low-density guidance of seed 000: every step but the last adds alpha * Sigma * the normalized "
                    "gradient of L_g1 (hardness contrast, Eq. 4) and beta * Sigma * that of L_g2 (real-vs-synthetic, "
                    "Eq. 6), Sigma the step's DDPM posterior std (for DDIM the DDPM std of the same step, whatever "
                    "eta). The guidance folder (tailforge train guidance) fixes what its networks see (x0_hat or "
                    "x_t). Each sample's json records alpha, beta, tau, the loss, the guidance input and the "
                    "sample's hardness under the guidance classifier. alpha = beta = 0 reproduces `gen baseline`.")
    lowdensity.add_argument("--model", required=True, help="class-conditional diffusion model folder")
    lowdensity.add_argument("--guidance", required=True, help="guidance folder (tailforge train guidance)")
    lowdensity.add_argument("--num", type=positive_int, required=True, help="number of samples")
    # SUPPRESS: an option left out is absent from args, so GuidanceConfig's own default applies.
    lowdensity.add_argument("--alpha", type=float, default=argparse.SUPPRESS,
                            help="scale of the hardness term (default: 0.5, the paper's)")
    lowdensity.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                            help="scale of the fidelity term (default: 0.5, the paper's)")
    lowdensity.add_argument("--tau", type=float, default=argparse.SUPPRESS,
                            help="temperature of Eq. 4 and Eq. 6 (default: 1; the paper gives no value)")
    lowdensity.add_argument("--loss", choices=("hardness", "softmax"), default=argparse.SUPPRESS,
                            help="hardness (default): Eq. 4/6 on class Gaussians of embeddings; softmax: the "
                                 "probability variant")
    add_sampling_options(lowdensity)
    add_job_options(lowdensity, "lowdensity")

    from tailforge.cli.shards import register as register_shards

    register_shards(sub)
