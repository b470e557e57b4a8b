"""Objects named as ``"package.module:attribute"`` text, imported when first used.

A registry whose entries name their functions this way (the samplers of gen/diffusion/config.py,
the corruptions of eval/config.py) is importable without torch, so the command line can list and
check its names (``--help``, config validation) without loading what the entries run.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.lru_cache(maxsize=None)
def resolve(ref: str) -> Any:
    """The object `ref` ("package.module:attribute") names, its module imported on first use."""
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{ref!r} is not 'package.module:attribute'")
    return getattr(importlib.import_module(module), name)
