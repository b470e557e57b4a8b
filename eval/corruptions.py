"""CIFAR-10-C corruptions at any image size (Hendrycks & Dietterich, ICLR 2019).

The benchmark corrupts each test image with 15 corruptions (noise, blur, weather, digital) at 5
severities, plus 4 extra ones held out for validation; robustness is the mean accuracy over
corruptions and severities. The parameters here are those of the authors' CIFAR-10-C generator
(``make_cifar_c.py``), written again in torch so they work on 8x8 digits and on batches:

* Photometric parameters (noise strengths, contrast, brightness, saturation, JPEG quality) do
  not depend on the image size and are used unchanged.
* Parameters that the CIFAR-10 generator states relative to the image (elastic transform, zoom
  factors, pixelation ratio) are applied relative to the image.
* Parameters in pixels (blur sigmas and radii, glass-blur displacement, motion-blur radius) are
  CIFAR-10-C's values for 32 px images scaled by ``size / reference_size`` (reference 32), the way
  ImageNet-C scaled them up for 224 px. At 8 px many blurs shrink below one pixel and leave the
  image unchanged: the report measures the fraction of images each cell leaves unchanged and
  leaves a corruption out of the mean when its severity 5 leaves most images unchanged. Set
  ``reference_size`` to the image size to apply CIFAR-10-C's pixel values unscaled instead.

``frost`` overlays crops of the benchmark's frost photographs, which the ``imagecorruptions`` wheel
ships (``pip install --no-deps imagecorruptions==1.1.2``, the ``frost`` extra); without them the suite
skips frost with a note. ``spatter`` (an extra corruption) cannot be computed here at any size: it
needs OpenCV's Canny edges and distance transform.
``saturate`` needs colour and is skipped for one-channel images.

Every image's randomness comes from its own generator seeded by (seed, corruption, severity,
image index), so results do not depend on batching.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tailforge.eval.config import CORRUPTIONS, REFERENCE_SIZE, SEVERITIES, CorruptionSuiteConfig
from tailforge.eval.results import tag_result
from tailforge.eval.stats import encode_bits
from tailforge.gen.core.errors import ConfigError
from tailforge.gen.core.noise import PerSampleNoise, sample_seed

Gens = Sequence[torch.Generator]


@dataclasses.dataclass(frozen=True)
class CorruptionContext:
    """What a corruption function needs besides the images."""

    severity: int  # 1..5
    gens: Gens  # one generator per image
    scale: float  # image size / reference size, for parameters in pixels


# --------------------------------------------------------------------------------------------
# Per-image random draws and small filters


def _rows(gens: Gens, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
    return torch.stack([draw(g) for g in gens])


def _randn(gens: Gens, shape: Sequence[int]) -> Tensor:
    return _rows(gens, lambda g: torch.randn(tuple(shape), generator=g))


def _rand(gens: Gens, shape: Sequence[int]) -> Tensor:
    return _rows(gens, lambda g: torch.rand(tuple(shape), generator=g))


def _uniform(gens: Gens, low: float, high: float) -> Tensor:
    return low + (high - low) * _rand(gens, ())


def _gaussian_kernel1d(sigma: float, truncate: float) -> Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    if sigma <= 0:
        return torch.tensor([1.0])
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _pad(x: Tensor, pad: int, mode: str) -> Tensor:
    """Pad H and W by `pad`; 'reflect' needs pad < size, so larger pads fall back to repeated
    reflection through 'replicate' (only reached by kernels wider than tiny images)."""
    if mode == "reflect" and pad >= min(x.shape[-2:]):
        mode = "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


def gaussian_filter(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "replicate") -> Tensor:
    """Separable Gaussian blur of NCHW images (scipy/skimage ``gaussian``: truncate at 4 sigma;
    mode 'replicate' is their 'nearest', 'reflect' their 'mirror')."""
    k = _gaussian_kernel1d(sigma, truncate).to(x)
    r = len(k) // 2
    c = x.shape[1]
    x = _pad(x, r, mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate every channel with a 2-D kernel, borders reflected (OpenCV's default REFLECT_101)."""
    r = kernel.shape[-1] // 2
    c = x.shape[1]
    return F.conv2d(_pad(x, r, "reflect"), kernel.to(x).view(1, 1, *kernel.shape).expand(c, 1, -1, -1), groups=c)


def _gray(x: Tensor) -> Tensor:
    """Luma (ITU-R 601, OpenCV's RGB2GRAY) of RGB images; the image itself when grayscale."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shifted(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """x[b, :, y + dy[b], x + dx[b]] with edge pixels repeated outside the image (integer shifts)."""
    b, _, h, w = x.shape
    rows = (torch.arange(h)[None, :] + dy[:, None]).clamp(0, h - 1)
    cols = (torch.arange(w)[None, :] + dx[:, None]).clamp(0, w - 1)
    out = x[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # B, H, W, C
    return out.permute(0, 3, 1, 2)


def motion_blur_kernel_offsets(radius: float, sigma: float, angle_deg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ImageMagick's MotionBlurImage (which the CIFAR-10-C generator calls through Wand): a
    one-sided kernel of width 2*ceil(radius)+1 with weights exp(-i^2 / 2 sigma^2), normalised, whose
    i-th tap reads the pixel i steps along `angle` (rounded to whole pixels). Returns the weights
    and the per-image (dy, dx) offsets of every tap."""
    width = int(2 * math.ceil(radius) + 1) if radius > 0 else 1
    i = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(i**2) / (2 * max(sigma, 1e-12) ** 2))
    weights = (weights / weights.sum()).float()
    a = torch.deg2rad(angle_deg.double())
    dx = torch.ceil(i[None, :] * torch.cos(a)[:, None] - 0.5).long()
    dy = torch.ceil(i[None, :] * torch.sin(a)[:, None] - 0.5).long()
    return weights, dy, dx


def _motion_blur(x: Tensor, radius: float, sigma: float, angle_deg: Tensor) -> Tensor:
    weights, dy, dx = motion_blur_kernel_offsets(radius, sigma, angle_deg)
    out = torch.zeros_like(x)
    for tap, w in enumerate(weights):
        out += w * _shifted(x, dy[:, tap], dx[:, tap])
    return out


def _zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the centre by `factor` (bilinear), keeping the size: scipy's zoom of a centre crop
    as in the generator's ``clipped_zoom``, without rounding the crop to whole pixels (which at
    8 px would round every factor below 1.07 to no zoom)."""
    theta = torch.tensor([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pil_roundtrip(x: Tensor, fn: Callable[[Image.Image], Image.Image]) -> Tensor:
    """Apply a PIL operation to every image (quantised to uint8 as the generator's PIL images are)."""
    arrays = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arrays:
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        res = np.asarray(fn(img))
        out.append(res[:, :, None] if res.ndim == 2 else res)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def plasma_fractal(gen: torch.Generator, mapsize: int, wibbledecay: float) -> Tensor:
    """Diamond-square height map in [0, 1] (the generator's fog pattern), mapsize a power of two."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    m = torch.zeros((mapsize, mapsize), dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: Tensor) -> Tensor:
        # CIFAR-10-C's generator: wibble * uniform(-wibble, wibble), noise of amplitude wibble**2, so
        # each finer level's noise shrinks by wibbledecay**2 and the pattern is smooth
        return a / 4 + wibble * wibble * (2 * torch.rand(a.shape, generator=gen, dtype=torch.float64) - 1)

    while step >= 2:
        half = step // 2
        corners = m[0::step, 0::step]
        square = corners + corners.roll(-1, 0)
        square = square + square.roll(-1, 1)
        m[half::step, half::step] = wibbled_mean(square)
        centres = m[half::step, half::step]
        corners = m[0::step, 0::step]
        lt = centres + centres.roll(1, 0) + corners + corners.roll(-1, 1)
        m[0::step, half::step] = wibbled_mean(lt)
        tt = centres + centres.roll(1, 1) + corners + corners.roll(-1, 0)
        m[half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.min()
    return (m / m.max()).float()


# --------------------------------------------------------------------------------------------
# The corruptions: x float NCHW in [0, 1] -> corrupted x (clipped to [0, 1] by the caller)


def gaussian_noise(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][ctx.severity - 1]
    return x + c * _randn(ctx.gens, x.shape[1:])


def shot_noise(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [500, 250, 100, 75, 50][ctx.severity - 1]
    return torch.stack([torch.poisson(xi * c, generator=g) for xi, g in zip(x, ctx.gens)]) / c


def impulse_noise(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """Salt-and-pepper on a fraction c of the values (each channel value independently, half
    salt, half pepper), as skimage's random_noise(mode='s&p') used by the generator."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][ctx.severity - 1]
    u = _rand(ctx.gens, (2, *x.shape[1:]))
    flipped, salted = u[:, 0] < c, u[:, 1] < 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


def speckle_noise(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [0.06, 0.1, 0.12, 0.16, 0.2][ctx.severity - 1]
    return x + x * c * _randn(ctx.gens, x.shape[1:])


def gaussian_blur(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [0.4, 0.6, 0.7, 0.8, 1.0][ctx.severity - 1]
    return gaussian_filter(x, c * ctx.scale)


def glass_blur(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """Blur, locally shuffle pixels, blur again, as CIFAR-10-C's released generator does.

    Its "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` runs on an HxWxC array, where both sides
    are views: the first assignment overwrites x[h, w], the second copies it back, so each visited
    pixel takes a neighbour's value and the neighbour keeps its own. Scanned from the bottom-right
    with offsets in [-max_delta, max_delta), a value therefore moves at most max_delta per pass."""
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][ctx.severity - 1]
    sigma, delta = sigma * ctx.scale, max(1, round(delta * ctx.scale))
    # the generator quantises to uint8 (truncating) before shuffling
    x = torch.floor(gaussian_filter(x, sigma).clamp(0, 1) * 255 + 1e-3) / 255
    b, _, h, w = x.shape
    positions = [(r, c) for _ in range(iterations) for r in range(h - delta, delta, -1) for c in range(w - delta, delta, -1)]
    if positions:
        offsets = _rows(ctx.gens, lambda g: torch.randint(-delta, delta, (len(positions), 2), generator=g))
        rows = torch.arange(b)
        for k, (r, c) in enumerate(positions):
            dx, dy = offsets[:, k, 0], offsets[:, k, 1]
            x[:, :, r, c] = x[rows, :, r + dy, c + dx]
    return gaussian_filter(x, sigma)


def defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """The generator's ``disk``: an aliased disk of `radius` on a 17x17 grid (larger for radius >
    8), normalised, smoothed by a 3x3 (5x5) Gaussian of sigma `alias_blur`; trimmed to its support."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    ksize = 3 if radius <= 8 else 5
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[None, :] ** 2 + grid[:, None] ** 2) <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-0.5 * (torch.arange(ksize, dtype=torch.float64) - ksize // 2) ** 2 / max(alias_blur, 1e-12) ** 2)
    g /= g.sum()
    smoothed = F.conv2d(F.pad(disk[None, None], (ksize // 2,) * 4, mode="reflect"), (g[:, None] * g[None, :])[None, None])[0, 0]
    support = min(half, int(math.floor(radius)) + ksize // 2)
    return smoothed[half - support:half + support + 1, half - support:half + support + 1].float()


def defocus_blur(x: Tensor, ctx: CorruptionContext) -> Tensor:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][ctx.severity - 1]
    return _filter2d(x, defocus_kernel(radius * ctx.scale, alias * ctx.scale))


def motion_blur(x: Tensor, ctx: CorruptionContext) -> Tensor:
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][ctx.severity - 1]
    return _motion_blur(x, radius * ctx.scale, sigma * ctx.scale, _uniform(ctx.gens, -45, 45))


def zoom_blur(x: Tensor, ctx: CorruptionContext) -> Tensor:
    top = [1.06, 1.11, 1.16, 1.21, 1.26][ctx.severity - 1]
    factors = np.arange(1, top, 0.01)
    out = x.clone()
    for z in factors:
        out += _zoom(x, float(z))
    return out / (len(factors) + 1)


def snow(x: Tensor, ctx: CorruptionContext) -> Tensor:
    loc, scale, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][ctx.severity - 1]
    layer = loc + scale * _randn(ctx.gens, (1, *x.shape[2:]))
    layer = _zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = torch.round(layer.clamp(0, 1) * 255) / 255  # the generator round-trips the layer through PNG
    layer = _motion_blur(layer, radius * ctx.scale, sigma * ctx.scale, _uniform(ctx.gens, -135, -45))
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def fog(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """Add a diamond-square fog pattern. It is drawn at the reference resolution (or the image's,
    if larger) and averaged down to smaller images, so an 8 px image gets CIFAR-10-C's fog reduced."""
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][ctx.severity - 1]
    size = x.shape[-1]
    extent = max(size, round(size / ctx.scale))
    mapsize = 1 << (extent - 1).bit_length()
    pattern = _rows(ctx.gens, lambda g: plasma_fractal(g, mapsize, decay)[:extent, :extent])[:, None]
    if extent != size:
        pattern = F.adaptive_avg_pool2d(pattern, size)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c * pattern) * max_val / (max_val + c)


# Frost (CIFAR-10-C): the benchmark's frost photographs, shipped in the `imagecorruptions` wheel. That
# package is only a container of files here: it is located through its installed metadata and never
# imported (its own code needs OpenCV, Wand and scikit-image).
FROST_DISTRIBUTION = "imagecorruptions"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_INSTALL = "pip install --no-deps imagecorruptions==1.1.2"
#: CIFAR-10-C shrinks the photographs to a fifth before cropping 32 px (ImageNet-C crops 224 px at full size)
FROST_PHOTO_SCALE = 0.2
#: the released code draws np.random.randint(5): frost6.jpg is listed but never chosen
FROST_CHOICES = 5


def frost_photographs() -> tuple[Path, ...]:
    """The six frost photographs of the installed `imagecorruptions` distribution, in the released
    code's order, or () when it is not installed or lacks any of them. Found from the installed file
    list (its RECORD), else beside the package's spec; nothing of the package is executed."""
    import importlib.metadata
    import importlib.util

    folder = None
    try:
        record = importlib.metadata.files(FROST_DISTRIBUTION) or []
        frost1 = next((f for f in record if f.name == FROST_FILES[0] and f.parent.name == "frost"), None)
        folder = Path(frost1.locate()).parent if frost1 is not None else None
    except importlib.metadata.PackageNotFoundError:
        pass
    if folder is None:
        spec = importlib.util.find_spec(FROST_DISTRIBUTION)  # a top-level name: finds, does not import
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    paths = tuple(folder / name for name in FROST_FILES) if folder is not None else ()
    return paths if paths and all(p.is_file() for p in paths) else ()


def frost_missing() -> str:
    """Why frost cannot be computed in this environment ("" when it can)."""
    if frost_photographs():
        return ""
    return (f"needs the benchmark's frost photographs from the imagecorruptions wheel ({FROST_INSTALL}, or the "
            "tailforge[frost] extra); not installed")


def _linear_taps(length: int, factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """cv2.resize(fx=factor, INTER_LINEAR) along one axis: round(length * factor) outputs, output i
    reading the input at (i + 0.5) / factor - 0.5 (clamped to the ends) between two neighbours."""
    src = ((torch.arange(max(1, round(length * factor)), dtype=torch.float64) + 0.5) / factor - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=length - 1)
    return low, (low + 1).clamp(max=length - 1), (src - low).clamp(0, 1).float()


@functools.lru_cache(maxsize=8)
def _frost_layers(paths: tuple[Path, ...], factor: float) -> tuple[Tensor, ...]:
    """The photographs as uint8 RGB [3, H, W] tensors resized by `factor` as cv2.resize does in the
    released code (bilinear, no antialiasing, rounded to uint8); an alpha channel is dropped, as
    cv2.imread drops it."""
    layers = []
    for path in paths:
        with Image.open(path) as photo:
            rgb = torch.from_numpy(np.asarray(photo.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
        low, high, frac = _linear_taps(rgb.shape[1], factor)
        rgb = rgb[:, low] * (1 - frac[:, None]) + rgb[:, high] * frac[:, None]
        low, high, frac = _linear_taps(rgb.shape[2], factor)
        rgb = rgb[:, :, low] * (1 - frac) + rgb[:, :, high] * frac
        layers.append(rgb.round().clamp(0, 255).to(torch.uint8))
    return tuple(layers)


def frost(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """c_image * x + c_frost * (a crop of a frost photograph), as CIFAR-10-C's released generator does:
    per image one of the first five photographs and a crop corner are drawn uniformly, from the
    photograph shrunk to a fifth. For images at the reference size or larger the shrink factor is
    scaled by size / reference size (the frost keeps its size relative to the image); a smaller image
    takes a reference-sized crop averaged down to its size, as fog does. One-channel images take the
    frost's luma."""
    image_weight, frost_weight = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][ctx.severity - 1]
    paths = frost_photographs()
    if not paths:
        raise ConfigError(f"corruption 'frost' cannot be computed here: {frost_missing()}")
    h, w = x.shape[-2:]
    crop_h, crop_w = max(h, round(h / ctx.scale)), max(w, round(w / ctx.scale))
    shortest = min(min(p.shape[1:]) for p in _frost_layers(paths, 1.0))
    # a photograph must be larger than the crop (only very large images need more than the scaled fifth)
    factor = max(FROST_PHOTO_SCALE * max(1.0, ctx.scale), (max(crop_h, crop_w) + 1) / shortest)
    layers = _frost_layers(paths, factor)
    crops = []
    for g in ctx.gens:
        layer = layers[int(torch.randint(FROST_CHOICES, (), generator=g))]
        top = int(torch.randint(layer.shape[1] - crop_h, (), generator=g))
        left = int(torch.randint(layer.shape[2] - crop_w, (), generator=g))
        crops.append(layer[:, top:top + crop_h, left:left + crop_w])
    layer = torch.stack(crops).float() / 255.0
    if (crop_h, crop_w) != (h, w):
        layer = F.adaptive_avg_pool2d(layer, (h, w))
    if x.shape[1] == 1:
        layer = _gray(layer)
    return image_weight * x + frost_weight * layer


def brightness(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """Add c to HSV value V. With hue and saturation fixed every channel is proportional to V,
    so RGB scales by V'/V (a black pixel, S = 0, becomes grey V')."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][ctx.severity - 1]
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def contrast(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][ctx.severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def saturate(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """Scale HSV saturation S' = S*a + b. With V and hue fixed a channel is V - (V - c)*S'/S; a grey
    pixel (S = 0) has hue 0 in skimage's conversion, so it turns red: R = V, G = B = V(1 - S')."""
    a, b = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][ctx.severity - 1]
    v, m = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    s = torch.where(v > 0, (v - m) / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], 1)
    return torch.where(s > 0, coloured, grey)


def jpeg_compression(x: Tensor, ctx: CorruptionContext) -> Tensor:
    quality = [80, 65, 58, 50, 40][ctx.severity - 1]

    def roundtrip(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert(img.mode)

    return _pil_roundtrip(x, roundtrip)


def pixelate(x: Tensor, ctx: CorruptionContext) -> Tensor:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][ctx.severity - 1]
    size = x.shape[-1]
    small = max(1, int(size * c))
    return _pil_roundtrip(x, lambda img: img.resize((small, small), Image.BOX).resize((size, size), Image.BOX))


def _affine_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """The 2x3 affine matrix mapping three (x, y) points `src` to `dst` (OpenCV's getAffineTransform)."""
    a = torch.cat([src, torch.ones(3, 1, dtype=src.dtype)], 1)
    return torch.linalg.solve(a, dst).T


def elastic_transform(x: Tensor, ctx: CorruptionContext) -> Tensor:
    """A random affine warp of three points (borders reflected) followed by a smooth random
    displacement field (uniform noise blurred with sigma, times alpha), all relative to the image
    size as in the generator."""
    size = x.shape[-1]
    alpha, sigma, jitter = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                            (0.1, 0.03, 0.03)][ctx.severity - 1]
    alpha, sigma, jitter = alpha * size, sigma * size, jitter * size
    b = len(x)
    centre, square = float(size // 2), float(size // 3)
    src = torch.tensor([[centre + square, centre + square], [centre + square, centre - square],
                        [centre - square, centre - square]], dtype=torch.float64)
    moves = (2 * _rand(ctx.gens, (3, 2)).double() - 1) * jitter
    disp = (2 * _rand(ctx.gens, (2, size, size)) - 1)
    # output pixel p reads the input at M^-1 p (warpAffine), then at (y + dy, x + dx) (map_coordinates)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    grids = []
    for i in range(b):
        m = _affine_from_points(src, src + moves[i])
        inverse = torch.linalg.inv(torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))[:2]
        grids.append(torch.stack([inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2],
                                  inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]], -1))
    x = _sample_pixels(x, torch.stack(grids))
    if alpha > 0:
        field = gaussian_filter(disp.reshape(b * 2, 1, size, size), sigma, truncate=3.0, mode="reflect") * alpha
        field = field.reshape(b, 2, size, size).double()
        x = _sample_pixels(x, torch.stack([xs + field[:, 0], ys + field[:, 1]], -1))
    return x


def _sample_pixels(x: Tensor, xy: Tensor) -> Tensor:
    """Bilinear sampling at pixel coordinates xy[b, h, w] = (x, y), borders reflected."""
    size = x.shape[-1]
    grid = ((xy + 0.5) / size * 2 - 1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def corruption_seed(seed: int, name: str, severity: int) -> int:
    return sample_seed(seed, 10 * list(CORRUPTIONS).index(name) + severity)


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0, indices: Sequence[int] | None = None,
            reference_size: int = REFERENCE_SIZE) -> Tensor:
    """Corrupt uint8 NCHW images with corruption `name` at `severity` (1..5); returns uint8.
    `indices` are the images' global indices (their noise streams); default 0..N-1."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    corruption = CORRUPTIONS[name]
    if not corruption.fn or corruption.missing_here():
        raise ConfigError(f"corruption {name!r} cannot be computed here: "
                          f"{corruption.unavailable or corruption.missing_here()}")
    if corruption.needs_colour and images.shape[1] != 3:
        raise ConfigError(f"corruption {name!r} needs RGB images, got {images.shape[1]} channel(s)")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {SEVERITIES}, got {severity}")
    if images.dtype != torch.uint8:
        raise ConfigError(f"corrupt() takes uint8 images, got {images.dtype}")
    indices = range(len(images)) if indices is None else indices
    gens = PerSampleNoise(corruption_seed(seed, name, severity), indices).generators
    ctx = CorruptionContext(severity=severity, gens=gens, scale=images.shape[-1] / reference_size)
    out = corruption.function()(images.float() / 255.0, ctx)
    # the generator stores np.uint8(corrupted * 255): truncation, not rounding (with a tolerance so
    # float round-off cannot turn an untouched value k into k - 1)
    return torch.floor(out.clamp(0, 1) * 255 + 1e-3).to(torch.uint8)


def applicable_corruptions(channels: int) -> tuple[list[str], dict[str, str]]:
    """The corruptions that can be computed for images with `channels` channels, and why the
    others cannot."""
    names, skipped = [], {}
    for name, c in CORRUPTIONS.items():
        if not c.fn:
            skipped[name] = c.unavailable
        elif c.missing_here():
            skipped[name] = c.missing_here()
        elif c.needs_colour and channels != 3:
            skipped[name] = "needs RGB images"
        else:
            names.append(name)
    return names, skipped


# --------------------------------------------------------------------------------------------
# The suite


def corruption_suite(classifier: torch.nn.Module, images: Tensor, labels: Tensor, *, names: Sequence[str] | None = None,
                     severities: Sequence[int] = SEVERITIES, seed: int = 0, reference_size: int = REFERENCE_SIZE,
                     batch_size: int = 1000, progress: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Accuracy of `classifier` (images -> logits) on every corruption and severity of the test
    images. Returns the report and one corrupted example per (corruption, severity) row for figures.

    A corruption whose highest severity leaves more than half of the images unchanged (after
    uint8 quantisation) has no effect at this image size; it is reported but left out of the means.
    One whose files are not installed here (frost) is skipped, named or not, with a one-line note in
    the report's "notes".
    """
    from tqdm import tqdm

    from tailforge.gen.models.classifiers import predict_logits

    available, skipped = applicable_corruptions(images.shape[1])
    not_installed = {n: skipped[n] for n in (names or CORRUPTIONS) if n in CORRUPTIONS and CORRUPTIONS[n].missing_here()}
    names = [n for n in names if n not in not_installed] if names else available
    for name in names:
        if name not in available:
            raise ConfigError(f"corruption {name!r} is not available for these images: "
                              f"{skipped.get(name, 'unknown name')}")
    clean = float((predict_logits(classifier, images).argmax(1) == labels).float().mean())
    rows, examples = {}, {}
    bar = tqdm(total=len(names) * len(severities), desc="corruptions", unit="cell", disable=not progress)
    for name in names:
        cells = []
        example_row = []
        for severity in severities:
            correct, unchanged, change, hits = 0, 0, 0.0, []
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                corrupted = corrupt(batch, name, severity, seed=seed, reference_size=reference_size,
                                    indices=range(start, start + len(batch)))
                hits.append(predict_logits(classifier, corrupted).argmax(1) == labels[start:start + len(batch)])
                correct += int(hits[-1].sum())
                unchanged += int((corrupted == batch).flatten(1).all(1).sum())
                change += float((corrupted.float() - batch.float()).abs().mean(dim=(1, 2, 3)).sum())
                if start == 0:
                    example_row.append(corrupted[0])
            cells.append({"severity": severity, "accuracy": correct / len(images),
                          "unchanged_fraction": unchanged / len(images), "mean_abs_change": change / len(images),
                          "correct": encode_bits(torch.cat(hits))})
            bar.update(1)
        effective = cells[-1]["unchanged_fraction"] <= 0.5
        corruption = CORRUPTIONS[name]
        rows[name] = {"family": corruption.family, "benchmark": corruption.benchmark, "effective": effective,
                      "mean_accuracy": float(np.mean([c["accuracy"] for c in cells])), "severities": cells}
        examples[name] = torch.stack(example_row)
    bar.close()

    def mean_over(selected: list[str]) -> float | None:
        return float(np.mean([rows[n]["mean_accuracy"] for n in selected])) if selected else None

    benchmark = [n for n in rows if rows[n]["benchmark"] and rows[n]["effective"]]
    families = {}
    for family in ("noise", "blur", "weather", "digital"):
        members = [n for n in benchmark if rows[n]["family"] == family]
        families[family] = mean_over(members)
    per_severity = {str(s): float(np.mean([rows[n]["severities"][i]["accuracy"] for n in benchmark]))
                    for i, s in enumerate(severities)} if benchmark else {}
    report = tag_result("corruptions", {
        "clean_accuracy": clean,
        "mean_corruption_accuracy": mean_over(benchmark),
        "relative_corruption_accuracy": (mean_over(benchmark) / clean) if benchmark and clean > 0 else None,
        "mean_extra_corruption_accuracy": mean_over([n for n in rows if not rows[n]["benchmark"] and rows[n]["effective"]]),
        "mean_accuracy_all_computed": mean_over(list(rows)),
        "families": families,
        "per_severity": per_severity,
        "included_in_mean": benchmark,
        "no_effect_at_this_size": [n for n in rows if not rows[n]["effective"]],
        "not_computed": skipped,
        "notes": [f"{n} skipped: {why}" for n, why in not_installed.items()],
        "corruptions": rows,
        "image_size": int(images.shape[-1]), "reference_size": reference_size, "severities": list(severities),
        "num_images": int(len(images)), "seed": seed,
    })
    return report, examples


def run_corruption_suite(config: CorruptionSuiteConfig, out: str | Path, *, device: str | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Run the suite, write OUT/corruptions.json and OUT/corruption_examples.png."""
    from tailforge.eval.features import load_eval_classifier
    from tailforge.eval.figures import image_grid, save_png_atomic
    from tailforge.gen.core.files import config_dict, write_json_atomic
    from tailforge.gen.data.datasets import load_dataset

    started = time.perf_counter()
    classifier, described = load_eval_classifier(config.classifier, diffaug_ensemble=config.diffaug_ensemble,
                                                 device=device)
    data = load_dataset(config.dataset, config.split)
    if config.limit:
        data = data.subset(range(min(config.limit, len(data))))
    report, examples = corruption_suite(classifier, data.images, data.labels, names=config.corruptions or None,
                                        severities=config.severities, seed=config.seed,
                                        reference_size=config.reference_size, progress=progress)
    report["config"] = {**config_dict(config), **described}
    report["seconds"] = round(time.perf_counter() - started, 2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # one test image per row: the clean image, then the severities of each corruption
    grid = torch.cat([torch.cat([data.images[:1], row]) for row in examples.values()])
    save_png_atomic(image_grid(grid, len(config.severities) + 1), out / "corruption_examples.png")
    report["examples_png"] = "corruption_examples.png"
    report["example_rows"] = list(examples)
    write_json_atomic(out / "corruptions.json", report)
    return report
