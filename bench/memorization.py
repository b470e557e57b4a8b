"""`tailforge bench memorization`: exact nearest-two search vs scikit-learn, and vs generation time.

The ratio criterion (Gu et al. 2023; Yoon et al. 2023) needs each generated image's nearest and second-nearest
training images. Ours is ``eval.memorization.nearest_two``, the k = 2 case of the search every
evaluation uses (``eval.neighbors.knn``: chunked, one matmul per chunk, float64 re-rank of the
candidates); the reference is scikit-learn's ``NearestNeighbors(n_neighbors=2,
algorithm="brute")`` fitted on the same flattened [-1, 1] pixels. Both must return the same
distances (checked; the largest difference is reported). Timings are best of interleaved repeats;
scikit-learn's includes its ``fit`` (for brute force that only stores the data).

The generated set is samples of a random-weight tiny U-Net (8x8 grey, digits-sized) drawn with
``gen.diffusion.samplers.generate_batch`` at the sampler and steps `tailforge eval memorization --model`
uses by default (MemorizationConfig: DDIM, 50 steps). Generating the whole set would take minutes
on a CPU, so one batch is generated and timed, and the set is that batch repeated to `num`
images; the generation time of the set is the timed batch's seconds per image times `num`
(generation is linear in the number of images, the search linear in queries x training images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from tailforge.bench import benchmark
from tailforge.bench.sampler import _random_model, best_seconds_interleaved
from tailforge.eval.config import MemorizationConfig
from tailforge.eval.memorization import NearestTwo, nearest_two
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.diffusion.samplers import generate_batch
from tailforge.gen.models.diffusion import load_diffusion_model


def sklearn_nearest_two(queries: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's exact brute-force 2-NN on flattened [-1, 1] pixels: (distances, indices), [M, 2]."""
    ref = uint8_to_float(reference).flatten(1).numpy()
    return NearestNeighbors(n_neighbors=2, algorithm="brute").fit(ref).kneighbors(uint8_to_float(queries).flatten(1).numpy())


def max_distance_difference(ours: NearestTwo, distances: np.ndarray) -> float:
    """Largest absolute difference between our (d1, d2) and scikit-learn's two distances."""
    return float(np.abs(torch.stack([ours.d1, ours.d2], 1).numpy() - distances).max())


@benchmark("memorization", "exact nearest-two search (ours) vs scikit-learn NearestNeighbors(brute), and its time vs "
                           "generating the same set (goals >= 3x faster; <= 5 % of generation)")
def bench_memorization(quick: bool, workdir: Path) -> dict[str, Any]:
    num, gen_batch, repeats = (2000, 32, 2) if quick else (10000, 128, 3)
    train = load_dataset("digits", "train")
    model_dir = _random_model(workdir / "tiny-8", "tiny", 8, 1)
    model = load_diffusion_model(model_dir, "cpu")
    defaults = MemorizationConfig(dataset="digits", model=str(model_dir))  # the sampler a --model run uses
    sampling = SamplingConfig(sampler=defaults.sampler, steps=defaults.steps)
    indices = list(range(gen_batch))
    batch = generate_batch(model, sampling, 0, indices, None)
    generated = batch.repeat((num + gen_batch - 1) // gen_batch, 1, 1, 1)[:num]

    gen_s, ours_s, sklearn_s = best_seconds_interleaved([
        lambda: generate_batch(model, sampling, 0, indices, None),
        lambda: nearest_two(generated, train.images, device="cpu"),
        lambda: sklearn_nearest_two(generated, train.images)], repeats)
    ours = nearest_two(generated, train.images, device="cpu")
    distances, _ = sklearn_nearest_two(generated, train.images)
    diff = max_distance_difference(ours, distances)
    np.testing.assert_allclose(torch.stack([ours.d1, ours.d2], 1).numpy(), distances, rtol=1e-5, atol=1e-4)
    generation_s = gen_s / gen_batch * num
    return {
        "generated": num, "train": len(train), "dims": int(train.images[0].numel()),
        "generated_set": f"{gen_batch} samples (DDIM {sampling.steps} steps, random-weight tiny U-Net) repeated to {num}",
        "ours_s": round(ours_s, 4), "sklearn_s": round(sklearn_s, 4),
        "speedup_ours_over_sklearn": round(sklearn_s / ours_s, 3), "goal_speedup_met": sklearn_s / ours_s >= 3,
        "max_abs_distance_difference": diff,
        "generation_s_of_set": round(generation_s, 2), "generation_s_per_image": round(gen_s / gen_batch, 5),
        "sampler": sampling.sampler, "steps": sampling.steps,
        "search_fraction_of_generation": round(ours_s / generation_s, 5),
        "goal_fraction_met": ours_s / generation_s <= 0.05,
    }
