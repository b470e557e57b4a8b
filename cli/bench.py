"""`tailforge bench NAME`: run benchmarks (tailforge.bench) and print their tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from tailforge.cli.commands import Command


def bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name, or `all`; `tailforge bench list` shows them")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU, minutes)")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON results and scratch files")


def run_bench(args: argparse.Namespace) -> int:
    """Run a benchmark (or `all`), print a table and write JSON with every figure and the machine it was
    measured on. --quick uses small sizes so everything runs on a 2-core CPU in minutes."""

    from tailforge.bench import load_benchmarks, run_benchmarks

    registry = load_benchmarks()
    if args.name == "list":
        for name, (_, description) in sorted(registry.items()):
            print(f"{name:<20} {description}")
        return 0
    names = sorted(registry) if args.name == "all" else [args.name]
    run_benchmarks(names, quick=args.quick, out=Path(args.out))
    return 0


COMMAND = Command(
    "bench", "benchmarks: figures as ratios against a baseline measured in the same run", run=run_bench,
    options=bench_options)
