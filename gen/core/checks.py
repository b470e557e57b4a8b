"""Per-value conditions of config fields, declared once in the field's annotation.

A field annotated ``steps: PositiveInt`` is checked by its config's ``__post_init__``
(:func:`check_fields`, a ConfigError naming the field and the value) and by the command line
(cli/flags.py gives argparse the same condition, so a bad flag is an argparse error before any
config is built). Conditions that relate several fields stay in the config's own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Annotated, Any, Callable, Iterable

from tailforge.gen.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition on one value; `expected` completes "expected ..., got VALUE"."""

    ok: Callable[[Any], bool]  # True for a good value
    expected: str  # what a good value is, e.g. "a positive integer"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """The value is one of a fixed set of names (argparse lists them as choices)."""

    values: tuple[str, ...]  # the allowed names, in the order help lists them

    def __init__(self, values: Iterable[str]):
        object.__setattr__(self, "values", tuple(sorted(values)))


PositiveInt = Annotated[int, Check(lambda v: v >= 1, "a positive integer")]
NonNegativeInt = Annotated[int, Check(lambda v: v >= 0, "an integer >= 0")]
PositiveFloat = Annotated[float, Check(lambda v: math.isfinite(v) and v > 0, "a finite positive number")]


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a field's annotation says about its values."""

    base: Any  # int, float, str, bool or a nested config class (for a tuple: the element's type)
    rule: Check | OneOf | None  # the condition on each value
    many: bool  # a tuple of values
    optional: bool  # None is allowed


def field_type(annotation: Any) -> FieldType:
    """Read ``X``, ``X | None``, ``tuple[X, ...]`` and ``Annotated[X, rule]`` (in that nesting)."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    many = typing.get_origin(annotation) is tuple
    if many:
        annotation = typing.get_args(annotation)[0]
    rule = None
    if typing.get_origin(annotation) is Annotated:
        rule = next((m for m in annotation.__metadata__ if isinstance(m, (Check, OneOf))), None)
        annotation = typing.get_args(annotation)[0]
    return FieldType(annotation, rule, many, optional)


def failure(rule: Check | OneOf, value: Any) -> str | None:
    """Why `value` breaks `rule` ("expected ..., got ...") or None when it is good."""
    if isinstance(rule, OneOf):
        return None if value in rule.values else f"expected one of {', '.join(rule.values)}, got {value!r}"
    return None if rule.ok(value) else f"expected {rule.expected}, got {value!r}"


@functools.lru_cache(maxsize=None)
def field_types(config_class: type) -> dict[str, FieldType]:
    """Every field's FieldType (annotations resolved, conditions included)."""
    hints = typing.get_type_hints(config_class, include_extras=True)
    return {field.name: field_type(hints[field.name]) for field in dataclasses.fields(config_class)}


#: what every float field must be, whatever its annotation adds (NaN and Inf are never a setting)
FINITE = Check(lambda v: math.isfinite(v), "a finite number")


def check_fields(config: Any) -> None:
    """Raise ConfigError for the first field whose value breaks its annotation's condition
    (a tuple: each element; None passes an optional field); a float field must be finite
    whether or not its annotation says more."""
    for name, kind in field_types(type(config)).items():
        value = getattr(config, name)
        rules = [rule for rule in (FINITE if kind.base is float else None, kind.rule) if rule is not None]
        if not rules or value is None:
            continue
        for item in value if kind.many else (value,):
            problem = next((p for p in (failure(rule, item) for rule in rules) if p), None)
            if problem:
                raise ConfigError(f"{name}: {problem}")


@functools.lru_cache(maxsize=None)
def field_comments(config_class: type) -> dict[str, str]:
    """Each field's comment in the source of the class that declares it (base classes first, so a
    subclass that redeclares a field wins): the one ending its line, else the comment lines right
    above it."""
    comments: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        if dataclasses.is_dataclass(cls):
            comments.update({name: text for name, text in _declared_comments(cls).items() if text})
    return comments


def _declared_comments(config_class: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(config_class))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comment_lines = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens
                     if tok.type == tokenize.COMMENT and tok.line.lstrip().startswith("#")}
    names = {field.name for field in dataclasses.fields(config_class)}
    comments: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        starts_statement = tokens[i - 1].type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        if (tok.type != tokenize.NAME or tok.string not in names or tok.string in comments or not starts_statement
                or tokens[i + 1].string != ":"):
            continue
        end = next(j for j in range(i, len(tokens)) if tokens[j].type == tokenize.NEWLINE)
        trailing = [t.string.lstrip("#").strip() for t in tokens[i:end + 1] if t.type == tokenize.COMMENT]
        above, row = [], tok.start[0] - 1
        while row in comment_lines:
            above.insert(0, comment_lines[row])
            row -= 1
        comments[tok.string] = " ".join(trailing or above)
    return comments
