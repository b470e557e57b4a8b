"""A command of the `tailforge` CLI and its parser, whose options are added only when it is used.

`tailforge --help` lists every command from these descriptions alone; a command's options (and
the config module they come from, with its torch import) are built when that command is parsed
or its help is shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
from typing import Any, Callable, Mapping

from tailforge.cli.flags import (
    DefaultsFormatter,
    Flag,
    PreformattedFormatter,
    add_config_flags,
    use_config_file,
    value_parser,
)
from tailforge.gen.core.checks import NonNegativeInt, field_type


@dataclasses.dataclass(frozen=True)
class Command:
    """One `tailforge [GROUP] NAME` command."""

    name: str  # the word that selects it
    summary: str  # its line in the listing of its group
    run: Callable[[argparse.Namespace], int]  # parsed arguments -> exit status; its docstring tops its --help
    config: str = ""  # "module:Class" of the config dataclass whose fields are its flags ("" = none)
    flags: Mapping[str, Flag | None] = dataclasses.field(default_factory=dict)  # see add_config_flags
    options: Callable[[argparse.ArgumentParser], None] | None = None  # the options that are no config field
    epilog: str = ""  # preformatted text after the options (the description then keeps its line breaks too)

    @property
    def description(self) -> str:
        return inspect.getdoc(self.run) or ""

    def config_class(self) -> type | None:
        if not self.config:
            return None
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def add_options(self, parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
        """Its options; returns the config fields' options by field name."""
        config_class, actions = self.config_class(), {}
        if config_class is not None:
            parser.add_argument("--config", metavar="FILE", default=None,
                                help="YAML, TOML or JSON file of these settings (nested configs as nested tables), "
                                     "or an output that saved them (a job's _job.json, classifier.json, a "
                                     "report's JSON) to reproduce it; flags given with it override it")
            actions = add_config_flags(parser, config_class, self.flags)
        if self.options is not None:
            self.options(parser)
        return actions


class CommandParser(argparse.ArgumentParser):
    """A parser that adds its command's options the first time it parses or shows help."""

    def __init__(self, *args: Any, command: Command | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending = command
        self.command = command
        self.config_actions: dict[str, argparse.Action] = {}

    def build(self) -> argparse.ArgumentParser:
        if self.pending is not None:
            command, self.pending = self.pending, None
            self.config_actions = command.add_options(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.build()
        if self.config_actions:  # --config FILE: its settings become the defaults, before the flags are read
            finder = argparse.ArgumentParser(add_help=False)
            finder.add_argument("--config", default=None)
            path = finder.parse_known_args(sys.argv[1:] if args is None else list(args))[0].config
            unspelled = use_config_file(self, self.command.config_class(), self.config_actions, path) if path else {}
            self.set_defaults(config_unspelled=unspelled)
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.build()
        return super().format_help()


def add_commands(sub: argparse._SubParsersAction, commands: list[Command]) -> None:
    for command in commands:
        parser = sub.add_parser(command.name, help=command.summary, description=command.description,
                                epilog=command.epilog or None, command=command,
                                formatter_class=PreformattedFormatter if command.epilog else DefaultsFormatter)
        parser.set_defaults(run=command.run)


def add_group(sub: argparse._SubParsersAction, name: str, summary: str, commands: list[Command]) -> None:
    """A command group (`tailforge NAME ...`) whose own subcommands are required."""
    group = sub.add_parser(name, help=summary, description=summary)
    add_commands(group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True,
                                      parser_class=CommandParser), commands)


def add_ray_options(parser: argparse.ArgumentParser, *, actors: bool = True) -> None:
    if actors:
        parser.add_argument("--actors", type=value_type(NonNegativeInt), default=None,
                            help="Ray actors, one model each (default: one per GPU, or 2 on a CPU-only cluster); "
                                 "0 runs in this process without Ray")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local instance)")


def add_out_option(parser: argparse.ArgumentParser, help_text: str = "output folder") -> None:
    parser.add_argument("--out", required=True, help=help_text)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="also write the report to this file")


def add_device_option(parser: argparse.ArgumentParser, default: str = "cuda if available, else cpu") -> None:
    parser.add_argument("--device", default=None, help=f"torch device (default: {default})")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def value_type(annotation: Any) -> Callable[[str], Any]:
    """An argparse `type` for an option that is no config field, from an annotation such as PositiveInt."""
    return value_parser(field_type(annotation))


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_report(report: dict[str, Any], json_path: str | None) -> None:
    """Print a report, and write the same JSON to `json_path` (--json) when one is given."""
    if json_path:
        from tailforge.gen.core.files import write_json_atomic

        write_json_atomic(json_path, report)
    print_json(report)


def name_value_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """NAME=VALUE items of a repeatable flag (e.g. --shards lowdensity=DIR) as a dict."""
    from tailforge.gen.core.errors import ConfigError

    pairs = {}
    for raw in values or ():
        name, sep, value = raw.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} expects NAME=VALUE, got {raw!r}")
        pairs[name] = value
    return pairs
