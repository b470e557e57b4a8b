"""Command-line flags generated from frozen config dataclasses, and configs built back from them.

Every field becomes ``--field-name`` (fields of a nested config dataclass are flattened: a
BaselineConfig's ``sampling`` gives ``--sampler``, ``--steps``, ``--eta``, ``--no-clip``). The help
text is the field's comment in the dataclass source and the default shown is the dataclass's, so
neither is written twice. The annotation gives the syntax: int and float (finite) values, strings,
``tuple[X, ...]`` as comma-separated values (a repeated flag adds more), ``X | None`` and the
conditions of gen/core/checks.py (a positive integer, one of a set of names), which argparse
checks before any config is built. A bool field is a flag that flips its default (``--no-field-name``
for a field that defaults to True).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

from tailforge.gen.core.checks import FieldType, OneOf, failure, field_comments, field_types


@dataclasses.dataclass(frozen=True)
class Flag:
    """A field's spelling where ``--field-name`` and its annotation's syntax do not fit."""

    name: str = ""  # the option without its dashes ("" keeps the field's name, underscores as dashes)
    parse: Callable[[str], Any] | None = None  # one occurrence's text -> the value (None: from the annotation)
    show: Callable[[Any], str] | None = None  # the default as one would type it (None: from the annotation)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where there is one to show (not for on/off flags,
    required options, None or "")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.required or action.default in (None, ""):
            return action.help
        return super()._get_help_string(action)


class PreformattedFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """DefaultsFormatter for a command whose description and epilog are laid out by hand."""


class ExtendTuple(argparse.Action):
    """A tuple field: each occurrence adds its values; the first one replaces the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, values if current is self.default else current + values)


def leaf_fields(config_class: type, defaults: Any = None) -> Iterator[tuple[str, FieldType, Any, str]]:
    """(name, type, default, comment) of every field, nested configs flattened; a nested field's
    default comes from the enclosing default instance (DemoConfig's 50-step SamplingConfig)."""
    kinds, comments = field_types(config_class), field_comments(config_class)
    for field in dataclasses.fields(config_class):
        if defaults is not None:
            default = getattr(defaults, field.name)
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        kind = kinds[field.name]
        if dataclasses.is_dataclass(kind.base) and not kind.many:
            yield from leaf_fields(kind.base, None if default is dataclasses.MISSING else default)
        else:
            yield field.name, kind, default, comments.get(field.name, "")


def value_parser(kind: FieldType) -> Callable[[str], Any]:
    """Text -> one value of the field's base type, checked against its condition."""
    rule, base = kind.rule, kind.base

    def parse(text: str) -> Any:
        if base is str:
            value = text
        elif base is bool:  # only optional bools take a value: true / false
            if text.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            value = text.lower() == "true"
        else:
            try:
                value = base(text)
            except ValueError:
                expected = rule.expected if rule is not None and not isinstance(rule, OneOf) else (
                    "an integer" if base is int else "a number")
                raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
            if base is float and not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        problem = failure(rule, value) if rule is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def tuple_parser(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse_all(text: str) -> tuple:
        return tuple(parse(part.strip()) for part in text.split(",") if part.strip())

    return parse_all


def default_text(value: Any) -> str:
    """A default as one would type it (what argparse shows and parses when the flag is absent)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, config_class: type,
                     flags: Mapping[str, Flag | None] | None = None) -> dict[str, argparse.Action]:
    """One option per (flattened) field of `config_class`; `flags` respells fields by name, and
    None leaves a field to an option the command adds itself. Returns the options by field name."""
    flags = flags or {}
    seen: set[str] = set()
    actions: dict[str, argparse.Action] = {}
    for name, kind, default, comment in leaf_fields(config_class):
        if name in seen:
            raise ValueError(f"{config_class.__name__}: two nested fields are both named {name!r}")
        seen.add(name)
        if name in flags and flags[name] is None:
            continue
        spec = flags.get(name) or Flag()
        on_off = kind.base is bool and not kind.optional
        option = "--" + (spec.name or ("no-" if on_off and default else "") + name.replace("_", "-"))
        text = comment.replace("%", "%%")  # argparse formats help with %
        if on_off:  # the flag flips the default; the comment describes the field being on
            actions[name] = parser.add_argument(option, dest=name, action="store_false" if default else "store_true",
                                                help=f"{text}; this flag turns it off" if default else text)
            continue
        settings: dict[str, Any] = {"dest": name, "help": text, "metavar": name.upper()}
        if spec.parse is not None:
            settings["type"] = spec.parse
        elif isinstance(kind.rule, OneOf) and not kind.many:  # argparse checks and lists the choices
            settings.update(type=str, choices=kind.rule.values, metavar=None)
        elif kind.many:
            settings.update(type=tuple_parser(value_parser(kind)), action=ExtendTuple)
        else:
            settings["type"] = value_parser(kind)
        if default is dataclasses.MISSING:
            settings["required"] = True
        else:  # as text: argparse parses it like a typed value when the flag is absent
            settings["default"] = None if default is None else (spec.show or default_text)(default)
        actions[name] = parser.add_argument(option, **settings)
    return actions


def use_config_file(parser: argparse.ArgumentParser, config_class: type, actions: Mapping[str, argparse.Action],
                    path: str) -> dict[str, Any]:
    """Make the settings of config file `path` (gen/core/config_files.py) the defaults of their
    options, so flags given with it override it; returns the settings no option spells (those the
    command spells itself, e.g. a training mix), for :func:`config_from_args`. A bad file is a
    parser error of one line."""
    from tailforge.gen.core.config_files import config_table, config_values, flat_values, read_config_file
    from tailforge.gen.core.errors import ConfigError

    try:
        data, saved = config_table(config_class, read_config_file(path))
        values = dict(flat_values(config_class, config_values(config_class, data, path, saved=saved)))
    except ConfigError as err:
        parser.error(str(err))
    unspelled = {}
    for name, value in values.items():
        if name in actions:  # a typed value is never re-parsed by argparse (only text defaults are)
            actions[name].default, actions[name].required = value, False
        else:
            unspelled[name] = value
    return unspelled


def config_from_args(config_class: type, args: argparse.Namespace, **given: Any) -> Any:
    """The config (nested ones included) from parsed flags; `given` sets fields directly (those a
    command spells itself), else a --config file's setting that no flag spells, else the flag; a
    field none of them sets keeps the dataclass's default."""
    unspelled = getattr(args, "config_unspelled", None) or {}
    values = {}
    for field in dataclasses.fields(config_class):
        kind = field_types(config_class)[field.name]
        if field.name in given:
            values[field.name] = given[field.name]
        elif dataclasses.is_dataclass(kind.base) and not kind.many:
            values[field.name] = config_from_args(kind.base, args)
        elif field.name in unspelled:
            values[field.name] = unspelled[field.name]
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return config_class(**values)
