"""Exact k-nearest-neighbour search in L2, the one every nearest-neighbour question uses: the
ratio criterion's nearest and second-nearest training images (Yoon et al. 2023; Gu et al. 2023),
at generation time (gen/methods/replicas.py) and in evaluation, AvgkNN (Sehwag et al. 2022), the
k-NN radii of precision/recall (Kynkaanniemi et al. 2019), the deep-kNN OOD score (Sun et al.
2022) and the feature-space nearest neighbours of the memorization check.

Both sets are processed in chunks, so memory stays at query_chunk x reference_chunk distances
whatever their sizes. Within a chunk, candidates are ranked by ||r||^2 - 2 q.r (||q - r||^2 less
the per-query constant ||q||^2; one matmul, no sqrt) in the inputs' precision; each query keeps
its k + 1 best candidates, which are re-ranked by distances recomputed in float64 from the
differences q - r. The re-rank is what makes near-duplicates (the case the ratio criterion is
about) exact: ||a||^2 + ||b||^2 - 2ab cancels catastrophically in float32 when a ~ b.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tailforge.gen.core.errors import ConfigError


@dataclasses.dataclass
class Neighbors:
    """The k nearest reference rows of each query, nearest first."""

    distances: Tensor  # float64 [M, k] L2 distances, ascending along each row
    indices: Tensor  # int64 [M, k] their rows in the reference set


def knn(queries: Tensor, reference: Tensor, k: int, *, exclude_self: bool = False, query_chunk: int = 1024,
        reference_chunk: int = 8192, device: str | torch.device | None = None) -> Neighbors:
    """Exact L2 k nearest `reference` rows of every `queries` row ([M, D] and [N, D]).

    ``exclude_self``: `queries` is `reference` (row i of both is the same point) and a point is
    not its own neighbour; other rows equal to it still are. Candidates are ranked in float64 when
    both inputs are float64 and in float32 otherwise; distances are always float64. ``device``
    (default: the queries') is where the search runs; the results are on the CPU."""
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise ConfigError(f"k-NN needs two [rows, values] sets with the same number of values, got "
                          f"{tuple(queries.shape)} and {tuple(reference.shape)}")
    if exclude_self and len(queries) != len(reference):
        raise ConfigError(f"exclude_self needs the queries to be the reference set, got {len(queries)} queries "
                          f"and {len(reference)} reference rows")
    available = len(reference) - int(exclude_self)
    if not 1 <= k <= available:
        raise ConfigError(f"k = {k} nearest neighbours need at least {k} reference rows, got {available}"
                          + (" besides the query itself" if exclude_self else ""))
    device = torch.device(device) if device else queries.device
    if not len(queries):
        return Neighbors(torch.empty((0, k), dtype=torch.float64), torch.empty((0, k), dtype=torch.long))
    rank_dtype = torch.float64 if queries.dtype == reference.dtype == torch.float64 else torch.float32
    keep = min(k + 1, available)  # one candidate more than asked for, as a margin for ranking round-off
    ref = reference.to(device, rank_dtype)
    ref_sq = ref.square().sum(1)
    distances, indices = [], []
    for qs in range(0, len(queries), query_chunk):
        q = queries[qs:qs + query_chunk].to(device, rank_dtype)
        best_d = torch.full((len(q), keep), float("inf"), dtype=rank_dtype, device=device)
        best_i = torch.zeros((len(q), keep), dtype=torch.long, device=device)
        for rs in range(0, len(ref), reference_chunk):
            chunk = ref[rs:rs + reference_chunk]
            # the chunk's best `keep` candidates, merged with the best so far
            dist = torch.addmm(ref_sq[rs:rs + len(chunk)], q, chunk.T, beta=1, alpha=-2)
            if exclude_self:
                rows = torch.arange(len(q), device=device)
                own = rows + qs - rs  # column of each query's own row in this chunk
                inside = (own >= 0) & (own < len(chunk))
                dist[rows[inside], own[inside]] = float("inf")
            top_d, top_i = dist.topk(min(keep, len(chunk)), dim=1, largest=False)
            best_d, pos = torch.cat([best_d, top_d], 1).topk(keep, dim=1, largest=False)
            best_i = torch.cat([best_i, top_i + rs], 1).gather(1, pos)
        # re-rank the candidates with exact float64 distances computed from the differences
        exact = (q.double().unsqueeze(1) - ref[best_i].double()).norm(dim=2)
        exact, order = exact.sort(dim=1)
        distances.append(exact[:, :k].cpu())
        indices.append(best_i.gather(1, order)[:, :k].cpu())
    return Neighbors(torch.cat(distances), torch.cat(indices))
