"""`tailforge bench NAME`: run benchmarks (tailforge.bench) and print their tables."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from tailforge.cli.commands import Command, print_json


def bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name, or `all`; `tailforge bench list` shows them")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU, minutes)")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON results and scratch files")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="an option of a benchmark that takes options (e.g. quality-speed's model=PATH; "
                             "`tailforge bench list` names them); repeat for more")


def benchmark_options(names: list[str], settings: list[str]) -> dict:
    """Each named benchmark's options instance from FIELD=VALUE texts (parsed as its options class's
    fields are on the command line); a FIELD no named benchmark has is an error."""
    from tailforge.bench import BENCHMARK_OPTIONS
    from tailforge.cli.flags import tuple_parser, value_parser
    from tailforge.gen.core.checks import field_types
    from tailforge.gen.core.errors import ConfigError

    pairs = {}
    for text in settings:
        field, sep, value = text.partition("=")
        if not sep or not field:
            raise ConfigError(f"--set {text!r}: expected FIELD=VALUE")
        pairs[field.strip().replace("-", "_")] = value
    classes = {name: BENCHMARK_OPTIONS[name] for name in names if name in BENCHMARK_OPTIONS}
    known = {field.name for cls in classes.values() for field in dataclasses.fields(cls)}
    if set(pairs) - known:
        raise ConfigError(f"--set: no benchmark of {names} takes {sorted(set(pairs) - known)}; "
                          f"their options: {sorted(known) or 'none'}")
    options = {}
    for name, cls in classes.items():
        values = {}
        for field, kind in field_types(cls).items():
            if field in pairs:
                parse = value_parser(kind)
                try:
                    values[field] = tuple_parser(parse)(pairs[field]) if kind.many else parse(pairs[field])
                except argparse.ArgumentTypeError as err:
                    raise ConfigError(f"--set {field}: {err}") from None
        options[name] = cls(**values)
    return options


def run_bench(args: argparse.Namespace) -> int:
    """Run a benchmark (or `all`): a table for people on stderr, and the JSON with every figure and the
    machine it was measured on on stdout and under --out. --quick uses small sizes so everything runs on a 2-core CPU in minutes."""

    from tailforge.bench import BENCHMARK_OPTIONS, load_benchmarks, run_benchmarks

    registry = load_benchmarks()
    if args.name == "list":
        for name, (_, description) in sorted(registry.items()):
            print(f"{name:<20} {description}")
            if name in BENCHMARK_OPTIONS:
                print(f"{'':<20} --set: {', '.join(f.name for f in dataclasses.fields(BENCHMARK_OPTIONS[name]))}")
        return 0
    names = sorted(registry) if args.name == "all" else [args.name]
    with contextlib.redirect_stdout(sys.stderr):  # the tables are for people; stdout carries the JSON
        results = run_benchmarks(names, quick=args.quick, out=Path(args.out),
                                 options=benchmark_options(names, args.settings))
    print_json(results)
    return 0


COMMAND = Command(
    "bench", "benchmarks: figures as ratios against a baseline measured in the same run", run=run_bench,
    options=bench_options)
