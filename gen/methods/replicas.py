"""Replicas of the training set: the ratio criterion of Yoon et al. 2023 and Gu et al. 2023.

Ratio criterion (Yoon et al. 2023 Section 3.1, validated in its Appendix D; adopted by Gu et al.
2023 Section 2): a generated image W is a replica of the training set S when

    ||W - NN1(W, S)||_2  <  1/3 * ||W - NN2(W, S)||_2

with NN1 / NN2 its nearest and second-nearest training images in L2, i.e. when its ratio
d1 / d2 < 1/3. As in both papers' released code it is measured in pixel space (flattened images;
here floats in [-1, 1], which only scales both distances and leaves the ratio unchanged).

Pure functions of tensors, shared by the memorization gate at generation time (gen/jobs/gate.py)
and by the memorization evaluation (eval/memorization.py), so both apply one definition.
Nearest neighbours are exact (gen/core/neighbors.py: chunked, float64 re-rank), so near-duplicates
(the case the criterion is about) are not blurred by float32 cancellation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tailforge.gen.core.device import default_device
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.core.neighbors import knn

#: Yoon et al. 2023 Section 3.1: replica when d1 / d2 < 1/3
RATIO_THRESHOLD = 1.0 / 3.0


@dataclasses.dataclass
class NearestTwo:
    """Nearest and second-nearest reference rows of each query."""

    d1: Tensor  # float64 [M] distance to the nearest reference row
    d2: Tensor  # float64 [M] distance to the second-nearest
    i1: Tensor  # int64 [M] index of the nearest
    i2: Tensor  # int64 [M] index of the second-nearest

    @property
    def ratio(self) -> Tensor:
        """d1 / d2 per query (0 where both distances are 0: two identical training images)."""
        return self.d1 / self.d2.clamp_min(1e-12)


def flat_pixels(images: Tensor) -> Tensor:
    """Images as [N, values] rows in pixel space: uint8 images mapped to [-1, 1], floats as they are."""
    images = uint8_to_float(images) if images.dtype == torch.uint8 else images
    return images.reshape(len(images), -1)


def nearest_two(queries: Tensor, reference: Tensor, *, query_chunk: int = 1024, reference_chunk: int = 8192,
                device: str | torch.device | None = None) -> NearestTwo:
    """Exact L2 nearest and second-nearest `reference` rows for each `queries` row (images are
    flattened by :func:`flat_pixels`), on the GPU when present."""
    if len(reference) < 2:
        raise ConfigError(f"the ratio criterion needs at least 2 reference images, got {len(reference)}")
    queries, reference = flat_pixels(queries), flat_pixels(reference)
    if queries.shape[1] != reference.shape[1]:
        raise ConfigError(f"generated images have {queries.shape[1]} values each, training images "
                          f"{reference.shape[1]}: they must have the same shape")
    two = knn(queries, reference, 2, query_chunk=query_chunk, reference_chunk=reference_chunk,
              device=default_device(device))
    return NearestTwo(*two.distances.unbind(1), *two.indices.unbind(1))


def ratio_criterion(d1: Tensor, d2: Tensor, threshold: float = RATIO_THRESHOLD) -> Tensor:
    """Yoon et al. 2023 Section 3.1: replica iff d1 < threshold * d2 (strict; a query whose two
    nearest training images are both at distance 0, i.e. duplicated training data, counts as a
    replica only if d1 < threshold * d2, which 0 < 0 is not)."""
    return d1 < threshold * d2
