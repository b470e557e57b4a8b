"""The procedural datasets of Yoon et al. 2023 (App. B.2): Mondrian, Gaussian-mixture dummy images, Random Ink."""

from __future__ import annotations

import numpy as np


def mondrian_images(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """Yoon et al. 2023 Sec. 3.1 "Mondrian" (MO): a cross whose pixels are i.i.d. uniform, and four quadrants
    each filled with one uniform random colour. The cross's position is uniform with every quadrant
    non-empty; its width is size // 16 (at least one pixel)."""
    width = max(1, size // 16)
    out = np.empty((n, channels, size, size))
    for i in range(n):
        row, col = rng.integers(1, size - width, size=2)
        colours = rng.random((4, channels))
        img = out[i]
        img[:, :row, :col] = colours[0][:, None, None]
        img[:, :row, col:] = colours[1][:, None, None]
        img[:, row:, :col] = colours[2][:, None, None]
        img[:, row:, col:] = colours[3][:, None, None]
        img[:, row:row + width, :] = rng.random((channels, width, size))
        img[:, :, col:col + width] = rng.random((channels, size, width))
    return out


def random_ink_images(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """Yoon et al. 2023 Sec. 3.3 "Random Ink" (RI): every pixel value an independent Bernoulli(1/2)."""
    return rng.integers(0, 2, size=(n, channels, size, size)).astype(np.float64)


def gaussian_mixture_images(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """Yoon et al. 2023 Appendix B.2 "GM" dummy images: 100 fixed uniform-random mean images; each sample
    picks one mean uniformly, adds isotropic Gaussian noise with std 0.5 per pixel, and clips to [0, 1].
    The 100 means depend only on the shape (fixed across splits and seeds), so train and test come
    from the same mixture."""
    means = np.random.default_rng([100, size, channels]).random((100, channels, size, size))
    picks = rng.integers(0, 100, size=n)
    return np.clip(means[picks] + rng.normal(0.0, 0.5, size=(n, channels, size, size)), 0.0, 1.0)
