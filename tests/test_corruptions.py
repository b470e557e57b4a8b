"""CIFAR-10-C corruptions at 8 and 32 px: shapes, determinism, hand-computed cases, library references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tailforge.eval.corruptions import (
    CORRUPTIONS,
    applicable_corruptions,
    corrupt,
    corruption_suite,
    defocus_kernel,
    gaussian_filter,
    motion_blur_kernel_offsets,
    plasma_fractal,
)
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.models.classifiers import create_classifier


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "test").images[:12]


@pytest.fixture(scope="module")
def rgb32():
    return torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("size", [8, 32])
def test_every_corruption_every_severity(size, digits, rgb32):
    images = digits if size == 8 else rgb32
    names, skipped = applicable_corruptions(images.shape[1])
    assert set(skipped) == ({"frost", "spatter", "saturate"} if size == 8 else {"frost", "spatter"})
    for name in names:
        previous = None
        for severity in (1, 3, 5):
            out = corrupt(images, name, severity, seed=0)
            assert out.dtype == torch.uint8 and out.shape == images.shape
            change = (out.float() - images.float()).abs().mean()
            if previous is not None and name not in ("glass_blur", "elastic_transform", "pixelate", "saturate"):
                # severities are ordered (up to the noise of one draw; saturate first desaturates)
                assert change >= previous - 3.0, (name, severity)
            previous = change


def test_deterministic_and_independent_of_batching(digits):
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "fog",
                 "elastic_transform"):
        whole = corrupt(digits, name, 3, seed=7)
        halves = torch.cat([corrupt(digits[:5], name, 3, seed=7, indices=range(5)),
                            corrupt(digits[5:], name, 3, seed=7, indices=range(5, 12))])
        assert torch.equal(whole, halves), name
        assert torch.equal(whole, corrupt(digits, name, 3, seed=7)), name
        assert not torch.equal(whole, corrupt(digits, name, 3, seed=8)), name


def test_contrast_and_brightness_by_hand():
    image = torch.tensor([[[[0, 100], [200, 255]]]], dtype=torch.uint8)
    x = image.double() / 255
    expected = torch.floor(((x - x.mean()) * 0.15 + x.mean()).clamp(0, 1) * 255 + 1e-3)  # severity 5: c = 0.15
    assert torch.equal(corrupt(image, "contrast", 5).double(), expected)
    # grey images: HSV value is the pixel itself, so brightness adds c = 0.3 and clips
    assert torch.equal(corrupt(image, "brightness", 5).double(), torch.floor((x + 0.3).clamp(0, 1) * 255 + 1e-3))
    # RGB: hue and saturation kept, value raised: a pure red pixel stays pure red
    red = torch.tensor([[[[128]], [[0]], [[0]]]], dtype=torch.uint8)
    assert corrupt(red, "brightness", 5)[0, :, 0, 0].tolist() == [int(np.floor((128 / 255 + 0.3) * 255 + 1e-3)), 0, 0]


def test_gaussian_noise_strength():
    grey = torch.full((64, 1, 8, 8), 128, dtype=torch.uint8)
    out = corrupt(grey, "gaussian_noise", 5).float()
    assert out.std().item() / 255 == pytest.approx(0.10, rel=0.1)  # CIFAR-10-C severity 5: sigma = 0.10


def test_gaussian_filter_matches_scipy():
    x = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_filter(x.float(), 1.3)
    ref = np.stack([ndimage.gaussian_filter(x[i, 0].numpy(), 1.3, mode="nearest", truncate=4.0) for i in range(2)])
    assert np.allclose(ours[:, 0].numpy(), ref, atol=1e-5)


def test_kernels():
    weights, dy, dx = motion_blur_kernel_offsets(3.0, 1.0, torch.tensor([0.0, 90.0]))
    assert len(weights) == 7 and weights.sum().item() == pytest.approx(1.0) and weights[0] == weights.max()
    assert dx[0].tolist() == list(range(7)) and dy[0].tolist() == [0] * 7  # angle 0: along +x
    assert dy[1].tolist() == list(range(7)) and dx[1].tolist() == [0] * 7  # angle 90: along +y
    for radius, alias in ((0.3, 0.4), (1.5, 0.1), (6, 0.5)):
        kernel = defocus_kernel(radius, alias)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5) and kernel.shape[0] % 2 == 1
    # near radius 8 the disk fills its grid and the smoothing reflects at the border (as cv2 does)
    assert defocus_kernel(10, 0.5).shape == (21, 21)
    pattern = plasma_fractal(torch.Generator().manual_seed(0), 32, 3)
    assert pattern.shape == (32, 32) and pattern.min() == 0 and pattern.max() == 1


def test_unavailable_corruptions_say_why(digits):
    with pytest.raises(ConfigError, match="frost photographs"):
        corrupt(digits, "frost", 1)
    with pytest.raises(ConfigError, match="RGB"):
        corrupt(digits, "saturate", 1)
    with pytest.raises(ConfigError, match="severity"):
        corrupt(digits, "contrast", 6)
    assert set(CORRUPTIONS) >= {"gaussian_noise", "jpeg_compression", "spatter"} and len(CORRUPTIONS) == 19


def test_suite_report(digits):
    torch.manual_seed(0)
    net = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    labels = load_dataset("digits", "test").labels[:12]
    report, examples = corruption_suite(net, digits, labels, names=["gaussian_noise", "defocus_blur", "contrast"],
                                        severities=(1, 5), progress=False)
    # at 8 px CIFAR-10-C's defocus radius (0.3-1.5 px at 32 px) is below one pixel: no effect, not averaged
    assert report["no_effect_at_this_size"] == ["defocus_blur"]
    assert report["included_in_mean"] == ["gaussian_noise", "contrast"]
    expected = np.mean([report["corruptions"][n]["mean_accuracy"] for n in ("gaussian_noise", "contrast")])
    assert report["mean_corruption_accuracy"] == pytest.approx(expected)
    assert examples["contrast"].shape == (2, 1, 8, 8)
    unscaled, _ = corruption_suite(net, digits, labels, names=["defocus_blur"], severities=(5,), reference_size=8,
                                   progress=False)
    assert unscaled["no_effect_at_this_size"] == []  # CIFAR-10-C's pixel radius applied unscaled


def _reference_plasma_fractal(mapsize: int, wibbledecay: float, uniform) -> np.ndarray:
    """CIFAR-10-C's released plasma_fractal (make_cifar_c.py), transcribed to numpy with its
    ``np.random.uniform(-wibble, wibble, shape)`` drawn through `uniform(low, high, shape)`."""
    maparray = np.zeros((mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        return array / 4 + wibble * uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


@pytest.mark.parametrize("mapsize, decay", [(32, 3), (16, 1.75), (64, 2.5)])
def test_fog_pattern_is_the_released_generators(mapsize, decay):
    # the same uniform draws in the same order: torch's U[0, 1) mapped to [low, high)
    gen = torch.Generator().manual_seed(4)

    def uniform(low, high, shape):
        return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64).numpy()

    expected = _reference_plasma_fractal(mapsize, decay, uniform)
    got = plasma_fractal(torch.Generator().manual_seed(4), mapsize, decay)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("severity", [1, 4])
def test_glass_blur_moves_a_pixel_at_most_one_step_per_pass(severity):
    # distinct values, so every output pixel names the input pixel it came from; at 8 px the blur's
    # sigma (0.05 or 0.25 of CIFAR's, times 8/32) leaves a quantised pixel unchanged
    values = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float() * 4 / 255
    image = values.view(1, 1, 8, 8)
    out = corrupt((image * 255).round().to(torch.uint8), "glass_blur", severity)
    src = {int(v): divmod(i, 8) for i, v in enumerate((image.view(-1) * 255).round().long())}
    passes = 1 if severity == 1 else 2
    moved = 0
    for r in range(8):
        for c in range(8):
            value = int(out[0, 0, r, c])
            if value in src:  # an unblurred pixel: where did it come from?
                r0, c0 = src[value]
                assert 0 <= r - r0 <= passes and 0 <= c - c0 <= passes  # offsets in [-1, 0]: from up/left
                moved += (r0, c0) != (r, c)
    assert moved > 0
