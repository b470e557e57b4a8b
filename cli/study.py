"""`tailforge study`: the demo over several seeds, every finding decided across them (tailforge.study)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from tailforge.cli.commands import Command, add_ray_options, print_json


def study_options(parser: argparse.ArgumentParser) -> None:
    add_ray_options(parser, actors=False)  # the generation actors are a demo setting (--demo-settings)


def run_study(args: argparse.Namespace) -> int:
    """Run the demo's whole pipeline once per seed (OUT/seed-0, seed-1, ...) with the dataset's preset of
    settings (digits: the demo's defaults; fashion-mnist: a 16x16 copy on a CPU, 28x28 with a GPU), then
    decide every paper finding from a Student-t interval across the seeds by the same rule as the demo, each
    seed's own interval kept; judge each shard set's samples (the evaluation classifier's class agreement, the
    Frechet distance to the real test split next to the real-vs-real floor); record every stage's seconds and
    the peak memory. Writes OUT/study.json and OUT/report/report.html (led by the findings, each seed's report
    linked). Every stage is cached in its seed's folder: a stopped study resumes where it stopped."""

    from tailforge.cli.flags import config_from_args
    from tailforge.config import StudyConfig
    from tailforge.study import run_study as study

    # stdout carries the result only (docs/formats.md, "Output"); the progress lines go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = study(config_from_args(StudyConfig, args), address=args.address)
    print_json({"report": result["report"], "study": f"{args.out}/study.json", "findings": [
        {k: v for k, v in row.items() if k != "per_seed"} for row in result["findings"]],
        "sample_quality": result["sample_quality"]["combined"]})
    return 0


COMMAND = Command(
    "study", "the demo over several seeds (Fashion-MNIST or digits): every finding with a t-interval across them",
    run=run_study, config="tailforge.config:StudyConfig", options=study_options)
