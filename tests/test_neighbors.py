"""The one exact k-NN search (eval.neighbors) against brute force: chunking, exclude-self, the
float64 re-rank of float32 inputs, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tailforge.eval.neighbors import distance_blocks, knn
from tailforge.gen.core.errors import ConfigError


def brute_force(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.sqrt(((queries[:, None, :] - reference[None, :, :]) ** 2).sum(-1))


@pytest.fixture(scope="module")
def points():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(41, 6, generator=gen, dtype=torch.float64),
            torch.randn(67, 6, generator=gen, dtype=torch.float64))


def test_knn_matches_brute_force_whatever_the_chunks(points):
    queries, reference = points
    d = brute_force(queries.numpy(), reference.numpy())
    for query_chunk, reference_chunk in ((1024, 8192), (5, 7), (1, 1)):
        found = knn(queries, reference, 4, query_chunk=query_chunk, reference_chunk=reference_chunk)
        assert found.distances.dtype == torch.float64 and found.indices.dtype == torch.long
        assert found.indices.tolist() == np.argsort(d, 1)[:, :4].tolist()
        np.testing.assert_allclose(found.distances.numpy(), np.sort(d, 1)[:, :4], rtol=1e-12)


def test_exclude_self_skips_the_query_but_not_its_duplicates(points):
    reference = torch.cat([points[1], points[1][:3]])  # rows 67..69 repeat rows 0..2
    d = brute_force(reference.numpy(), reference.numpy())
    np.fill_diagonal(d, np.inf)
    found = knn(reference, reference, 3, exclude_self=True, query_chunk=8, reference_chunk=5)
    np.testing.assert_allclose(found.distances.numpy(), np.sort(d, 1)[:, :3], rtol=1e-12, atol=1e-15)
    assert (found.indices != torch.arange(len(reference))[:, None]).all()
    assert found.distances[0, 0] == 0 and found.indices[0, 0] == 67  # its duplicate, at distance 0


def test_float32_near_copies_are_exact_after_the_float64_rerank():
    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(200, 3072, generator=gen) * 2 - 1
    queries = reference[:20].clone()
    queries[:, 0] += 1 / 127.5  # one pixel off by one grey level
    found = knn(queries, reference, 2)
    assert found.indices[:, 0].tolist() == list(range(20))
    exact = (queries.double() - reference[:20].double()).norm(dim=1)
    assert torch.equal(found.distances[:, 0], exact)  # no float32 cancellation left in d1


def test_knn_refuses_what_it_cannot_answer(points):
    queries, reference = points
    with pytest.raises(ConfigError, match="k = 68"):
        knn(queries, reference, 68)
    with pytest.raises(ConfigError, match="besides the query itself"):
        knn(reference, reference, 67, exclude_self=True)
    with pytest.raises(ConfigError, match="exclude_self"):
        knn(queries, reference, 2, exclude_self=True)
    with pytest.raises(ConfigError, match="same number of values"):
        knn(queries, reference[:, :5], 2)
    empty = knn(queries[:0], reference, 3)
    assert empty.distances.shape == empty.indices.shape == (0, 3)


def test_distance_blocks_cover_every_pair(points):
    queries, reference = points
    blocks = torch.cat(list(distance_blocks(queries, reference, 6)))
    np.testing.assert_allclose(blocks.numpy(), brute_force(queries.numpy(), reference.numpy()), rtol=1e-10)
