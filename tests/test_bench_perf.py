"""Contracts of the benchmark helpers (the benchmarks themselves are commands, not timed tests)."""

from __future__ import annotations

import numpy as np
import torch

from tailforge.eval.bench import load_benchmarks
from tailforge.eval.bench_memorization import max_distance_difference, sklearn_nearest_two
from tailforge.eval.bench_reconstruct import within_tolerance
from tailforge.eval.memorization import nearest_two


def test_every_issue_benchmark_is_registered():
    assert {"sampler", "ray", "stream", "lowdensity-cost", "guidance", "reconstruct", "diffaug",
            "memorization"} <= set(load_benchmarks())


def test_within_tolerance_is_relative_to_t_re():
    assert within_tolerance(0.29, 0.3) and within_tolerance(0.54, 0.5) and within_tolerance(1.05, 1.0)
    assert not within_tolerance(0.34, 0.3) and not within_tolerance(0.44, 0.5)


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
