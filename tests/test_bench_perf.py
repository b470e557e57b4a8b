"""Contracts of the benchmark helpers (the benchmarks themselves are commands, not timed tests)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tailforge.bench import load_benchmarks
from tailforge.bench.demo import run_measured
from tailforge.bench.memorization import max_distance_difference, sklearn_nearest_two
from tailforge.bench.reconstruct import within_tolerance
from tailforge.bench.sampler import interleaved_seconds, median_ratio
from tailforge.eval.memorization import nearest_two


def test_every_issue_benchmark_is_registered():
    assert {"sampler", "ray", "stream", "lowdensity-cost", "guidance", "reconstruct", "diffaug",
            "memorization", "demo"} <= set(load_benchmarks())


def test_within_tolerance_is_relative_to_t_re():
    assert within_tolerance(0.29, 0.3) and within_tolerance(0.54, 0.5) and within_tolerance(1.05, 1.0)
    assert not within_tolerance(0.34, 0.3) and not within_tolerance(0.44, 0.5)


def test_median_ratio_pairs_each_round_with_itself():
    # per-round ratios 3, 2, 2: the median is 2, where the ratio of the best-of figures is 3 / 1
    assert median_ratio([3.0, 6.0, 6.0], [1.0, 3.0, 3.0]) == 2.0
    assert median_ratio([3.0, 1.0, 10.0], [1.0, 1.0, 1.0]) == 3.0


def test_interleaved_seconds_runs_every_function_once_per_round_after_a_warm_up():
    calls = []
    seconds = interleaved_seconds([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 4 and [len(s) for s in seconds] == [3, 3]


def test_our_nearest_two_matches_scikit_learn_brute_force():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (300, 1, 8, 8), generator=gen, dtype=torch.uint8)
    copies = reference[:10].clone()
    copies[:, 0, 0, 0] ^= 1  # near copies: one pixel off by one grey level
    queries = torch.cat([torch.randint(0, 256, (50, 1, 8, 8), generator=gen, dtype=torch.uint8), copies])
    ours = nearest_two(queries, reference)
    distances, indices = sklearn_nearest_two(queries, reference)
    assert max_distance_difference(ours, distances) < 1e-5
    assert (indices[50:, 0] == np.arange(10)).all()  # a near copy's nearest image is its source


#: a child that holds 300 MB while its own child holds another 300 MB (both pages touched)
HOLD_300MB = "import numpy as np, time; a = np.ones(300 * 2**20, np.uint8); time.sleep(1.5)"
PARENT_AND_CHILD = (f"import subprocess, sys, numpy as np; p = subprocess.Popen([sys.executable, '-c', {HOLD_300MB!r}]); "
                    "a = np.ones(300 * 2**20, np.uint8); p.wait()")


def test_run_measured_sums_the_memory_of_the_whole_process_tree(tmp_path):
    measured = run_measured([sys.executable, "-c", PARENT_AND_CHILD], tmp_path / "log", rss_interval=0.05,
                            pss_every=2)
    assert 0.55 <= measured["peak_pss_gib"] <= measured["peak_rss_sum_gib"] < 1.5
    assert measured["seconds"] >= 1.5


def test_run_measured_names_the_log_of_a_failed_command(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 3.*fail.log"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")
