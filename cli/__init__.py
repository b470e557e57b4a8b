"""The `tailforge` command line: every command and flag is registered here.

    tailforge train diffusion|classifier|guidance ...   cli/train.py
    tailforge gen baseline|reconstruct|lowdensity ...   cli/gen.py
    tailforge eval accuracy|corruptions|ood|... ...     cli/eval.py
    tailforge shards verify DIR                         cli/shards.py
    tailforge demo                                      cli/demo.py (the embedded default)
    tailforge study                                     cli/study.py (the demo over several seeds)
    tailforge bench NAME                                cli/bench.py

A command (cli/commands.py) names the config dataclass its flags come from (cli/flags.py) and
adds its other options; its parser is built only when it is used, so `tailforge --help` imports
neither torch nor Ray. A command is a function taking the parsed arguments and returning an exit
code. Errors in user input (TailforgeError) print one line and exit with status 2, and so does an
OSError (a full disk, read-only storage, no permission: ``PATH: what went wrong``; a job that knows
what it kept says so itself, see gen/jobs/runner.py); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from tailforge import __version__
from tailforge.cli import bench, demo, gen, shards, study, train
from tailforge.cli import eval as eval_commands
from tailforge.cli.commands import Command, CommandParser, add_commands, add_group

#: `tailforge GROUP COMMAND`: group name -> (summary, commands)
GROUPS: dict[str, tuple[str, list[Command]]] = {
    "train": (train.SUMMARY, train.COMMANDS),
    "gen": (gen.SUMMARY, gen.COMMANDS),
    "shards": (shards.SUMMARY, shards.COMMANDS),
    "eval": (eval_commands.SUMMARY, eval_commands.COMMANDS),
}

#: `tailforge COMMAND`
TOP_LEVEL: list[Command] = [demo.COMMAND, study.COMMAND, bench.COMMAND]


def all_commands() -> dict[str, Command]:
    """Every command by its words after `tailforge`, e.g. "gen baseline"."""
    commands = {f"{group} {c.name}": c for group, (_, members) in GROUPS.items() for c in members}
    return {**commands, **{c.name: c for c in TOP_LEVEL}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailforge",
        description="Diffusion data generation and augmentation for classifier training: low-density "
                    "shards, reconstructed datasets, DiffAug, and the evaluations that measure them.",
        epilog="Run `tailforge COMMAND --help` for each command's options. Long jobs run on a local Ray "
               "instance, or join a cluster with --address / $RAY_ADDRESS.")
    parser.add_argument("--version", action="version", version=f"tailforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name, (summary, commands) in GROUPS.items():
        add_group(sub, name, summary, commands)
    add_commands(sub, TOP_LEVEL)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tailforge.gen.core.errors import TailforgeError

    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join(word for word in (args.command, getattr(args, "subcommand", None)) if word)
    try:
        return int(args.run(args) or 0)
    except TailforgeError as err:
        print(f"tailforge {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from tailforge.gen.data.storage import os_error_message

        print(f"tailforge {command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from what was recorded", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
