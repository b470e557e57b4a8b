"""The harness of the hostile-input table (tests/test_hostile_*.py).

Each case is what an adversary or a careless user does, the outcome tailforge promises, and the
check that nothing outside the job's own files changed. The table's files each define ``CASES``
(a list of :class:`Hostile`) and run them through :func:`run_command` / :func:`check_outcome`;
tests/test_hostile_table.py counts them by class and checks the table is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable

#: the classes of failure the table covers (the reliability issue's numbering)
CLASSES = ("data-loss", "hang", "disclosure", "silent-wrong-data", "traceback", "unclear-error", "durability",
           "concurrency")


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One row of the table."""

    name: str  # what the adversary does, in a few words (the test id)
    klass: str  # one of CLASSES
    expect: str  # "error": a one-line error naming the culprit, exit status 2; "accept": exit 0, data intact
    message: str = ""  # regex the error line must match (it names the file, field or value)

    def __post_init__(self):
        assert self.klass in CLASSES, self.klass
        assert self.expect in ("error", "accept"), self.expect
        assert self.expect == "accept" or self.message, f"{self.name}: an error case must say what it names"


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int  # exit status
    stdout: str
    stderr: str


def run_command(argv: list[str], cwd: Path | None = None) -> Outcome:
    """`tailforge ARGV` in this process, as the console script runs it (exit status, output)."""
    from tailforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(previous)
    return Outcome(int(code or 0), out.getvalue(), err.getvalue())


def check_outcome(case: Hostile, outcome: Outcome) -> None:
    """The promise of the case: one line, status 2, naming the culprit; or status 0."""
    if case.expect == "accept":
        assert outcome.code == 0, f"{case.name}: expected acceptance, got {outcome.code}: {outcome.stderr[-500:]}"
        return
    lines = [line for line in outcome.stderr.strip().splitlines() if line.strip()]
    # progress bars may write to stderr before the error; the error itself is the last line, alone
    error = lines[-1] if lines else ""
    assert outcome.code == 2, f"{case.name}: expected exit status 2, got {outcome.code}: {outcome.stderr[-800:]}"
    assert "Traceback" not in outcome.stderr, f"{case.name}: traceback instead of one line:\n{outcome.stderr[-800:]}"
    assert "error" in error, f"{case.name}: last stderr line is not an error: {error!r}"
    assert re.search(case.message, error), f"{case.name}: {error!r} does not name {case.message!r}"


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under `root` outside the `exclude` folders: what must not change."""
    excluded = [Path(p).resolve() for p in exclude]
    state = {}
    for path in sorted(Path(root).rglob("*")):
        resolved = path.resolve()
        if not path.is_file() or any(resolved == e or e in resolved.parents for e in excluded):
            continue
        data = path.read_bytes()
        state[str(path.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return state


def assert_untouched(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]], case: Hostile) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{case.name}: files outside the job's own were changed, created or removed: {changed}"
