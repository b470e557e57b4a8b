"""The `tailforge` command line: one subcommand group per package.

    tailforge train diffusion|classifier ...   cli/train.py
    tailforge gen baseline ...                 cli/gen.py
    tailforge eval accuracy ...                cli/eval.py
    tailforge demo                             demo.py (the embedded default)

Each group module exposes ``register(subparsers)``; a command is a function taking the parsed
arguments and returning an exit code. Errors in user input (TailforgeError) print one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from tailforge import __version__


def build_parser() -> argparse.ArgumentParser:
    from tailforge.cli import eval as eval_cli
    from tailforge.cli import gen as gen_cli
    from tailforge.cli import train as train_cli

    parser = argparse.ArgumentParser(
        prog="tailforge",
        description="Diffusion data generation and augmentation for classifier training: low-density "
                    "shards, reconstructed datasets, DiffAug, and the evaluations that measure them.",
        epilog="Run `tailforge COMMAND --help` for each command's options. Long jobs run on a local Ray "
               "instance, or join a cluster with --address / $RAY_ADDRESS.")
    parser.add_argument("--version", action="version", version=f"tailforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train_cli, gen_cli, eval_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tailforge.gen.core.errors import TailforgeError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TailforgeError as err:
        print(f"tailforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from what was recorded", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
