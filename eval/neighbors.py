"""Nearest-neighbour questions of evaluation. The exact k-NN search itself (:func:`knn`) lives
in gen/core/neighbors.py, because generation's memorization gate uses it too (gen imports nothing
from eval); every evaluation imports it from here.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from tailforge.gen.core.neighbors import Neighbors, knn

__all__ = ["Neighbors", "distance_blocks", "knn"]


def distance_blocks(queries: Tensor, reference: Tensor, chunk_size: int) -> Iterator[Tensor]:
    """float64 L2 distances [chunk_size, len(reference)] of successive chunks of `queries`, for
    the questions that need every distance rather than the k smallest (which balls contain a
    point, Kynkaanniemi et al. 2019)."""
    q, r = queries.double(), reference.double()
    for start in range(0, len(q), chunk_size):
        yield torch.cdist(q[start:start + chunk_size], r)
