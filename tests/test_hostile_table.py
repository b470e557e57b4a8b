"""The hostile-input table as a whole: at least 60 cases, every class of the reliability issue
covered, names unique (docs/cluster.md summarises it)."""

from __future__ import annotations

import collections
import importlib
from pathlib import Path

from hostile import CLASSES, Hostile

TABLE_FILES = sorted(p.stem for p in Path(__file__).parent.glob("test_hostile_*.py") if p.stem != Path(__file__).stem)


def all_cases() -> list[Hostile]:
    cases = []
    for name in TABLE_FILES:
        cases += importlib.import_module(name).CASES
    return cases


def test_the_table_covers_every_class_with_at_least_60_cases():
    cases = all_cases()
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), [n for n, k in collections.Counter(names).items() if k > 1]
    counts = collections.Counter(c.klass for c in cases)
    assert len(cases) >= 60, f"{len(cases)} cases: {dict(counts)}"
    assert set(counts) == set(CLASSES), f"classes without a case: {set(CLASSES) - set(counts)}"
