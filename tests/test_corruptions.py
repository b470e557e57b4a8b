"""CIFAR-10-C corruptions at 8 and 32 px: shapes, determinism, hand-computed cases, library references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tailforge.eval import corruptions
from tailforge.eval.config import CORRUPTIONS
from tailforge.eval.corruptions import (
    CorruptionContext,
    applicable_corruptions,
    corrupt,
    corruption_suite,
    defocus_kernel,
    frost,
    frost_photographs,
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
    not_installed = set() if frost_photographs() else {"frost"}
    assert set(skipped) == ({"spatter", "saturate"} if size == 8 else {"spatter"}) | not_installed
    for name in names:
        previous = None
        for severity in (1, 3, 5):
            out = corrupt(images, name, severity, seed=0)
            assert out.dtype == torch.uint8 and out.shape == images.shape
            change = (out.float() - images.float()).abs().mean()
            # frost: the released severity 4 and 5 darken the image more than 3 under almost the same
            # frost weight, so their pixel change can be smaller (test_frost_weight_grows_with_severity)
            if previous is not None and name not in ("glass_blur", "elastic_transform", "pixelate", "saturate",
                                                     "frost"):
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


def test_unavailable_corruptions_say_why(digits, monkeypatch):
    monkeypatch.setattr(corruptions, "frost_photographs", lambda: ())
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


# --------------------------------------------------------------------------------------------
# frost: crops of the benchmark's photographs (the imagecorruptions wheel, installed with --no-deps)

needs_frost = pytest.mark.skipif(not frost_photographs(), reason="frost photographs not installed "
                                 "(pip install --no-deps imagecorruptions==1.1.2)")


def _frost_context(severity: int, count: int, scale: float = 1.0) -> CorruptionContext:
    """The same per-image generators at every severity, so every severity draws the same crops."""
    return CorruptionContext(severity=severity, gens=[torch.Generator().manual_seed(100 + i) for i in range(count)],
                             scale=scale)


def test_frost_photographs_are_found_without_importing_the_package(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "imagecorruptions", raising=False)
    paths = frost_photographs()
    assert "imagecorruptions" not in sys.modules  # located from its installed files, never executed
    assert [p.name for p in paths] in ([], ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg",
                                            "frost6.jpg"])


@needs_frost
def test_frost_deterministic_for_a_seed_and_independent_of_batching(digits, rgb32):
    for images in (digits, rgb32):
        whole = corrupt(images, "frost", 3, seed=7)
        halves = torch.cat([corrupt(images[:4], "frost", 3, seed=7, indices=range(4)),
                            corrupt(images[4:], "frost", 3, seed=7, indices=range(4, len(images)))])
        assert torch.equal(whole, halves) and torch.equal(whole, corrupt(images, "frost", 3, seed=7))
        assert not torch.equal(whole, corrupt(images, "frost", 3, seed=8))
        assert whole.shape == images.shape and whole.dtype == torch.uint8


@needs_frost
def test_frost_weight_grows_with_severity(rgb32):
    # with the same crops, frost(x) = a x + b f for every image x: two images give a, then b f; the frost's
    # weight relative to the image's, b / a, grows with every severity (CIFAR-10-C: 0.2, 0.3, 0.44, 0.47, 0.6)
    x = rgb32[:2].float() / 255
    ratios = []
    for severity in range(1, 6):
        ctx = _frost_context(severity, 1)
        y1, y2 = frost(x[:1], ctx), frost(x[1:], _frost_context(severity, 1))
        a = float(((y1 - y2) / (x[:1] - x[1:])).nan_to_num().median())
        layer = y1 - a * x[:1]
        assert torch.allclose(y2, a * x[1:] + layer, atol=1e-5)  # one weighted sum for both images
        ratios.append(float(layer.norm()) / a)
    assert all(lo < hi for lo, hi in zip(ratios, ratios[1:])), ratios


@needs_frost
def test_frost_distance_from_the_clean_image_grows_with_severity(digits):
    # a black image shows the frost alone, so its distance from the clean image grows with the frost weight
    # (never down; 0.4 at severities 3 and 4); on digits severity 5 is further than 1
    black = torch.zeros(16, 1, 8, 8, dtype=torch.uint8)
    crops = [frost(black.float(), _frost_context(s, 16, scale=0.25)).mean().item() for s in range(1, 6)]
    assert all(lo <= hi + 1e-6 for lo, hi in zip(crops, crops[1:])) and crops[0] < crops[-1], crops
    change = [(corrupt(digits, "frost", s).float() - digits.float()).abs().mean().item() for s in (1, 5)]
    assert change[0] < change[1]


@needs_frost
def test_frost_grey_images_take_the_frost_luma():
    rgb = frost(torch.zeros(3, 3, 32, 32), _frost_context(2, 3))
    grey = frost(torch.zeros(3, 1, 32, 32), _frost_context(2, 3))
    luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    assert torch.allclose(grey, luma, atol=1e-6) and grey.max() > 0


@needs_frost
def test_frost_is_a_crop_of_a_photograph_shrunk_as_cv2_resize_does():
    from PIL import Image

    # at the reference size a black image at severity 1 is 0.2 x a 32 px crop of one of the first five
    # photographs shrunk to a fifth; cv2.resize(INTER_LINEAR) samples the source at (i + 0.5) / 0.2 - 0.5
    layer = frost(torch.zeros(4, 3, 32, 32), _frost_context(1, 4)) / 0.2 * 255
    shrunk = []
    for path in frost_photographs()[:5]:
        photo = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        rows = (np.arange(round(photo.shape[0] * 0.2)) + 0.5) / 0.2 - 0.5
        cols = (np.arange(round(photo.shape[1] * 0.2)) + 0.5) / 0.2 - 0.5
        grid = np.meshgrid(rows.clip(0, None), cols.clip(0, None), indexing="ij")
        shrunk.append(np.stack([ndimage.map_coordinates(photo[:, :, c], grid, order=1, mode="nearest")
                                for c in range(3)]))
    for crop in layer.double().numpy():
        best = min(np.abs(np.lib.stride_tricks.sliding_window_view(s, (3, 32, 32))[0] - crop).max(axis=(-3, -2, -1)).min()
                   for s in shrunk)
        assert best <= 1.0  # the same window, up to uint8 rounding


def test_frost_skipped_with_a_note_when_the_photographs_are_absent(digits, monkeypatch):
    monkeypatch.setattr(corruptions, "frost_photographs", lambda: ())
    names, skipped = applicable_corruptions(1)
    assert "frost" not in names and "imagecorruptions" in skipped["frost"]
    torch.manual_seed(0)
    net = create_classifier("tinycnn", num_classes=10, in_chans=1).eval()
    labels = load_dataset("digits", "test").labels[:12]
    report, _ = corruption_suite(net, digits, labels, names=["frost", "contrast"], severities=(1,), progress=False)
    assert list(report["corruptions"]) == ["contrast"] and "frost" in report["not_computed"]
    assert len(report["notes"]) == 1 and report["notes"][0].startswith("frost skipped: ")
    assert "\n" not in report["notes"][0] and "pip install --no-deps imagecorruptions==1.1.2" in report["notes"][0]
