"""Small argparse helpers shared by the command groups."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def add_group(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    """A command group (`tailforge NAME ...`) whose own subcommands are required."""
    group = sub.add_parser(name, help=help_text, description=help_text)
    return group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)


def add_command(group: argparse._SubParsersAction, name: str, help_text: str, run, description: str | None = None,
                ) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=description or help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actors", type=non_negative_int, default=None,
                        help="Ray actors, one model each (default: one per GPU, or 2 on a CPU-only cluster); "
                             "0 runs in this process without Ray")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local instance)")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
