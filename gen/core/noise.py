"""Per-sample randomness.

Each generated sample draws all of its noise (initial x_T and every ancestral step) from its own
generator seeded by (job_seed, global_index). A sample's noise is therefore the same whatever
batch it lands in and however many actors ran the job, which is what makes shards reproducible
byte for byte and resumable without duplicating or changing samples (DESIGN.md, "Per-sample
randomness").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tailforge.gen.core.errors import ConfigError


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from a tuple of integers. numpy's SeedSequence hashes the tuple, so neighbouring
    tuples give unrelated streams (a plain `seed + index` would make job 0's sample 1 equal job 1's
    sample 0)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def sample_seed(job_seed: int, index: int) -> int:
    """A 64-bit seed for sample `index` of job `job_seed` (see :func:`derive_seed`)."""
    if job_seed < 0 or index < 0:
        raise ConfigError(f"job_seed and index must be >= 0, got {job_seed}, {index}")
    return derive_seed(job_seed, index)


class PerSampleNoise:
    """Gaussian noise with one CPU generator per batch row (moved to the batch's device).

    Noise is drawn on the CPU so a sample is identical on CPU and GPU workers.
    """

    def __init__(self, job_seed: int, indices: Sequence[int]):
        self.job_seed = int(job_seed)
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator().manual_seed(sample_seed(self.job_seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
        """Noise of shape [len(self), *shape]; row i comes from sample i's generator."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ConfigError(f"batch of {x.shape[0]} rows but noise for {len(self)} samples")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)

