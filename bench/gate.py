"""`tailforge bench gate`: what the memorization gate (gen/jobs/gate.py) costs as a share of
generation time.

The gate adds two costs to a job: scoring every candidate (its nearest and second-nearest
training images, gen/methods/replicas.py) and generating a new candidate for every replica it
drops. Both are measured on the job's own source (gen/jobs/sources.py BaselineSource, so the
same sampler, steps and model as a `tailforge gen baseline` job): for each batch of the planned
samples, the batch's generation and its scoring are timed back to back, so a load change on the
machine hits both alike. Reported:

* ``scoring_share``: scoring seconds / generation seconds, the mean over batches with a bootstrap
  interval over batches;
* ``replica_fraction``: the share of the planned samples the gate at ``max_nn_ratio`` would drop,
  with its exact (Clopper-Pearson) interval; a gated job draws 1 / (1 - f) candidates per kept
  sample on average (each candidate independently a replica with probability f);
* ``gate_share``: the whole gate's extra time over the ungated job's,
  (1 + scoring_share) / (1 - replica_fraction) - 1, with the interval from both ends.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

from tailforge.bench import BenchmarkUnavailable, benchmark
from tailforge.eval.stats import bootstrap, proportion_interval
from tailforge.gen.core.checks import OneOf, PositiveInt, check_fields
from tailforge.gen.diffusion.config import SAMPLERS, SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig, NNRatio
from tailforge.gen.jobs.gate import replica_gate
from tailforge.gen.jobs.sources import BaselineSource
from tailforge.gen.methods.replicas import nearest_two, ratio_criterion


@dataclasses.dataclass(frozen=True)
class GateBenchOptions:
    """`tailforge bench gate --set FIELD=VALUE`."""

    model: str = "demo-out/models/diffusion"  # trained diffusion model folder (`tailforge demo` writes this one)
    train_dataset: str = ""  # the gate's training set (dataset spec); "": the one the model folder records
    num_samples: PositiveInt = 320  # planned samples scored (--quick: 64)
    batch_size: PositiveInt = 32  # samples per generation batch, each batch one timed item
    sampler: Annotated[str, OneOf(SAMPLERS)] = "ddpm"  # the demo's sampler
    steps: PositiveInt = 50  # the demo's steps
    max_nn_ratio: NNRatio = 1 / 3  # the gate's threshold (Yoon et al. 2023's replica ratio)

    def __post_init__(self):
        check_fields(self)


@benchmark("gate", "the memorization gate's cost as a share of generation time: scoring each candidate "
                   "(nearest two training images) and regenerating the replicas it drops", options=GateBenchOptions)
def bench_gate(quick: bool, workdir: Path, options: GateBenchOptions) -> dict[str, Any]:
    if not (Path(options.model) / "unet").is_dir():
        raise BenchmarkUnavailable(f"no diffusion model folder at {options.model}; run `tailforge demo` or "
                                   "--set model=FOLDER")
    num = min(options.num_samples, 64) if quick else options.num_samples
    config = BaselineConfig(model=options.model, num=num, batch_size=options.batch_size,
                            sampling=SamplingConfig(sampler=options.sampler, steps=options.steps),
                            max_nn_ratio=options.max_nn_ratio, train_dataset=options.train_dataset or None)
    source = BaselineSource(dataclasses.replace(config, max_nn_ratio=None))  # generation alone
    gate = replica_gate(config.max_nn_ratio, config.train_dataset, source.model, num, source.device)
    shares, replica, generation_s, scoring_s = [], [], 0.0, 0.0
    for first in range(0, num, options.batch_size):
        indices = list(range(first, min(first + options.batch_size, num)))
        started = time.perf_counter()
        images, _, _ = source.batch(indices)
        generated = time.perf_counter()
        nn2 = nearest_two(images, gate.train, device=source.device)
        scored = time.perf_counter()
        replica += ratio_criterion(nn2.d1, nn2.d2, options.max_nn_ratio).tolist()
        shares.append((scored - generated) / (generated - started))
        generation_s, scoring_s = generation_s + generated - started, scoring_s + scored - generated
    scoring, fraction = bootstrap(shares), proportion_interval(replica)

    def total(share: float, f: float) -> float:
        return (1 + share) / (1 - f) - 1 if f < 1 else float("inf")

    return {
        "model": options.model, "train_images": len(gate.train), "samples": num, "batches": len(shares),
        "sampler": options.sampler, "steps": options.steps, "max_nn_ratio": options.max_nn_ratio,
        "generation_s_per_sample": round(generation_s / num, 5), "scoring_s_per_sample": round(scoring_s / num, 6),
        "scoring_share": scoring.as_dict(), "replicas": sum(replica), "replica_fraction": fraction.as_dict(),
        "gate_share": {"estimate": total(scoring.estimate, fraction.estimate),
                       "low": total(scoring.low, fraction.low), "high": total(scoring.high, fraction.high),
                       "level": scoring.level},
    }
