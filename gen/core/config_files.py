"""Config files: a frozen config dataclass's fields as YAML, TOML or JSON, or an output that saved one.

A file holds the fields of one config (``tailforge COMMAND --config FILE``, or :func:`load_config`
from Python), nested configs as nested tables::

    model = "runs/model"        # TOML; YAML and JSON spell the same table
    num = 1000
    [sampling]
    sampler = "ddim"
    steps = 50

Every key must be a field (a typo is a ConfigError naming the file and the key) and every value
must have the field's type and meet its annotation's condition (gen/core/checks.py). A file that an
output wrote can be given as it is, to reproduce that output: a generation job's ``_job.json``
(the config plus the ``pins`` of the folders it read), and any JSON that keeps its config under
``config``, ``train_config`` or ``job`` (reports and summary.json, a classifier's classifier.json,
a model's tailforge.json, guidance.json, a shard set's _info.json); keys such an output records
next to the config's own fields (the evaluation classifier's architecture, say) are not settings
and are ignored there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from tailforge.gen.core.checks import FieldType, failure, field_types
from tailforge.gen.core.errors import ConfigError

#: where an output keeps the config it was made with, in the order they are looked for
SAVED_CONFIG_KEYS = ("config", "train_config", "job")
#: what a generation job's _job.json records beside its config's fields (gen/jobs/runner.py)
JOB_RECORD_KEYS = ("pins",)
SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The table a YAML (.yaml, .yml), TOML (.toml) or JSON (.json) file holds."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: a config file ends in {', '.join(SUFFIXES)}, not {path.suffix or 'nothing'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    try:
        if kind == "YAML":
            import yaml

            data = yaml.safe_load(text)
        elif kind == "TOML":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # each parser has its own error class; all mean the same to the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: not valid {kind}: {first_line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    return data


def config_table(config_class: type, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the settings in `data`, whether `data` is an output that saved them): a saved output's
    config is under one of SAVED_CONFIG_KEYS (where that key is no field of the config, or names a
    nested config that is not a table), a job's _job.json is the config plus JOB_RECORD_KEYS."""
    kinds = field_types(config_class)
    for key in SAVED_CONFIG_KEYS:
        value = data.get(key)
        if isinstance(value, dict) and not (key in kinds and dataclasses.is_dataclass(kinds[key].base)):
            return value, True
    if any(key in data and key not in kinds for key in JOB_RECORD_KEYS):
        return {k: v for k, v in data.items() if k not in JOB_RECORD_KEYS}, False
    return data, False


def config_values(config_class: type, data: dict[str, Any], where: str, *, saved: bool = False,
                  prefix: str = "") -> dict[str, Any]:
    """`data`'s settings of `config_class`, checked: a key that is no field is an error (ignored in a
    `saved` output), a value of the wrong type or breaking its field's condition too; nested configs
    stay tables (dicts) of their own checked settings. `where` (the file) and `prefix` (the enclosing
    tables) name the key in errors."""
    kinds = field_types(config_class)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in kinds:
            if saved:
                continue
            raise ConfigError(f"{where}: unknown setting {prefix + key!r}; {config_class.__name__} has "
                              f"{', '.join(kinds)}")
        kind = kinds[key]
        if dataclasses.is_dataclass(kind.base) and not kind.many and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix + key}: expected a table of {kind.base.__name__} settings, "
                                  f"got {value!r}")
            values[key] = config_values(kind.base, value, where, saved=saved, prefix=f"{prefix}{key}.")
        else:
            values[key] = _checked(kind, value, where, prefix + key, saved)
    return values


def _checked(kind: FieldType, value: Any, where: str, key: str, saved: bool) -> Any:
    """One field's value in the field's own type (a tuple for a list, a float for an integer
    number), or a ConfigError naming the file (`where`) and the `key` and saying what was expected."""
    if value is None:
        if kind.optional:
            return None
        raise ConfigError(f"{where}: {key}: expected a value, got null")
    if kind.many:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return tuple(_one(kind, item, where, f"{key}[{i}]", saved) for i, item in enumerate(value))
    return _one(kind, value, where, key, saved)


def _one(kind: FieldType, value: Any, where: str, key: str, saved: bool) -> Any:
    base = kind.base
    if dataclasses.is_dataclass(base):  # an element of a tuple of configs (a training mix's sources)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a table of {base.__name__} settings, got {value!r}")
        return build_config(base, config_values(base, value, where, saved=saved, prefix=f"{key}."), where)
    expected = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(base)
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ConfigError(f"{where}: {key}: expected {expected or base.__name__}, got {value!r}")
    problem = failure(kind.rule, value) if kind.rule is not None else None
    if problem:
        raise ConfigError(f"{where}: {key}: {problem}")
    return value


def build_config(config_class: type, values: dict[str, Any], where: str, defaults: Any = None) -> Any:
    """The config from checked `values` (config_values); a nested table sets only the fields it
    names on the field's default (DemoConfig's 50-step sampling stays 50-step unless it says
    otherwise). A required field the table lacks, or a check across fields, fails as a ConfigError
    naming `where`."""
    kinds = field_types(config_class)
    kwargs = {}
    for field in dataclasses.fields(config_class):
        if field.name not in values:
            continue
        value, kind = values[field.name], kinds[field.name]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind.base) and not kind.many:
            base = getattr(defaults, field.name) if defaults is not None else _default(field)
            value = build_config(kind.base, value, where, base if base is not dataclasses.MISSING else None)
        kwargs[field.name] = value
    try:
        return dataclasses.replace(defaults, **kwargs) if defaults is not None else config_class(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:  # a required field the file does not set
        raise ConfigError(f"{where}: {err}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def load_config(config_class: type, path: str | os.PathLike, **overrides: Any) -> Any:
    """`config_class` from a config file (or a saved output), `overrides` set last: the Python
    side of ``--config FILE`` (``load_config(BaselineConfig, "run/_job.json", num=10)``)."""
    data, saved = config_table(config_class, read_config_file(path))
    values = config_values(config_class, data, str(path), saved=saved)
    return build_config(config_class, {**values, **overrides}, str(path))


def flat_values(config_class: type, values: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(field name, value) of every leaf setting in checked `values`, nested tables flattened as the
    command line flattens them (cli/flags.py: a BaselineConfig's sampling.steps is --steps)."""
    kinds = field_types(config_class)
    for name, value in values.items():
        kind = kinds[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind.base) and not kind.many:
            yield from flat_values(kind.base, value)
        else:
            yield name, value
