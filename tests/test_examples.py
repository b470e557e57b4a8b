"""The examples/ scripts run end to end at toy size (their --toy flag), as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script, expected", [
    ("diffaug_loop.py", "test top-1"),
    ("timm_mix.py", "images read by timm"),
    ("generate_shards.py", "reconstruct t_re=0.3: 40 samples"),
])
def test_example_runs_at_toy_size(script, expected, tmp_path):
    command = [sys.executable, str(EXAMPLES / script), "--toy"]
    if script != "diffaug_loop.py":
        command += ["--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout
