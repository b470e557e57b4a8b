"""`tailforge gen ...`: generation jobs that write WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from tailforge.cli.commands import Command, add_out_option, add_quiet_option, add_ray_options, print_json
from tailforge.cli.flags import Flag, config_from_args

#: SamplingConfig's spelling in every command that samples.
SAMPLING_FLAGS = {"clip_denoised": Flag("no-clip")}
#: low-density guidance's fields, where a bare name would not say what it belongs to
GUIDANCE_FLAGS = {"scale_by": Flag("guidance-scale-by")}


def add_job_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser, "output folder for shards, records and _info.json")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out that holds no job yet; the files already there are never "
                             "deleted or overwritten (one with the name of a file the job writes is an error)")
    add_quiet_option(parser)
    add_ray_options(parser)


def run_job(args: argparse.Namespace, config) -> int:
    from tailforge.gen.jobs.runner import run_generation

    records = run_generation(args.out, config, actors=args.actors, address=args.address, progress=not args.quiet,
                             force=args.force)
    gated = {} if config.max_nn_ratio is None else {"replicas_dropped": sum(r.replicas_dropped or 0 for r in records)}
    print_json({"out": args.out, "shards": len(records), "samples": sum(r.count for r in records),
                "seconds": round(sum(r.seconds for r in records), 2), **gated})
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    """Sample --num images (class-balanced labels: sample i gets class i mod C) and write them as WebDataset
    shards with a timm _info.json. Re-running the same command skips shards that are already recorded."""

    from tailforge.gen.jobs.config import BaselineConfig

    return run_job(args, config_from_args(BaselineConfig, args))


def run_lowdensity(args: argparse.Namespace) -> int:
    """Sample --num class-balanced images like `gen baseline` (same seeds, same noise) with the low-density
    guidance of Sehwag et al. 2022: every step but the last adds alpha * Sigma * the normalized gradient of L_g1
    (hardness contrast, Eq. 4) and beta * Sigma * that of L_g2 (real-vs-synthetic, Eq. 6), Sigma the step's DDPM
    posterior std (for DDIM the DDPM std of the same step, whatever eta). The guidance folder (tailforge train
    guidance) fixes what its networks see (x0_hat or x_t). Each sample's json records alpha, beta, tau, the
    loss, the guidance input and the sample's hardness under the guidance classifier. alpha = beta = 0
    reproduces `gen baseline`."""

    from tailforge.gen.jobs.config import LowDensityConfig

    return run_job(args, config_from_args(LowDensityConfig, args))


#: gen reconstruct's t_re values when neither --t-re nor a --config file gives one
DEFAULT_T_RE = (0.3, 0.5, 0.7, 1.0)


def fraction_list(text: str) -> list[float]:
    """A comma-separated list of fractions in [0, 1] (reconstruction's t_re values)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every t_re must be a fraction of T in [0, 1], got {text!r}")
    return values


def reconstruct_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--t-re", dest="t_re_values", type=fraction_list, default=None,
                        help="comma-separated reverse steps as fractions of T, one shard set each (default: "
                             f"{','.join(map(str, DEFAULT_T_RE))}, or the t_re of --config)")
    add_job_options(parser)


def run_reconstruct(args: argparse.Namespace) -> int:
    """Diffuse every image of a dataset split forward to t_re (a fraction of the model's T) and run the reverse
    process back to 0 on a Ray actor pool, writing one shard set per t_re to OUT/t_re_<value> (t_re 0.3 goes to
    OUT/t_re_0p3, read as shards:OUT/t_re_0p3). Labels are the source labels; each sample's json names its
    source key and t_re. t_re = 0 copies the real images, t_re = 1 is full class-conditional generation. --steps
    is the full chain's step count; the chain from t_re runs round(steps * t_re) of them; each set's job name is
    JOB_t_re_<value> (the t_re of a --config file, e.g. a set's own _job.json, keeps the file's job name). Re-running
    the same command skips shards that are already recorded."""

    from tailforge.gen.jobs.config import ReconstructConfig
    from tailforge.gen.jobs.runner import run_generation
    from tailforge.gen.jobs.sources import shard_set_name

    outputs = {}
    # a --config file's t_re (without --t-re) is one saved set: its job name is kept, to re-make that set
    saved_set = args.t_re_values is None and "t_re" in args.config_unspelled
    for t_re in [args.config_unspelled["t_re"]] if saved_set else args.t_re_values or DEFAULT_T_RE:
        name = shard_set_name(t_re)
        config = config_from_args(ReconstructConfig, args, t_re=t_re, job=args.job if saved_set else f"{args.job}_{name}")
        out = str(Path(args.out) / name)
        records = run_generation(out, config, actors=args.actors, address=args.address, progress=not args.quiet,
                                 force=args.force)
        outputs[name] = {"out": out, "t_re": t_re, "samples": sum(r.count for r in records),
                         "seconds": round(sum(r.seconds for r in records), 2)}
    print_json(outputs)
    return 0


SUMMARY = "generate WebDataset shards with a diffusion model on a Ray actor pool"

COMMANDS = [
    Command(
        "baseline", "plain class-conditional sampling into shards", run=run_baseline,
        config="tailforge.gen.jobs.config:BaselineConfig", flags=SAMPLING_FLAGS, options=add_job_options),
    Command(
        "reconstruct", "real-sample reconstruction (Yamaguchi & Fukuda, Algorithm 1): diffuse to t_re, reverse back",
        run=run_reconstruct, config="tailforge.gen.jobs.config:ReconstructConfig",
        flags={**SAMPLING_FLAGS, "t_re": None}, options=reconstruct_options),
    Command(
        "lowdensity", "low-density sampling with alpha/beta guidance (Sehwag et al. 2022, Algorithm 1) into shards",
        run=run_lowdensity, config="tailforge.gen.jobs.config:LowDensityConfig",
        flags={**SAMPLING_FLAGS, **GUIDANCE_FLAGS},
        options=add_job_options),
]
