"""Procedural cardiac short-axis MRI slices with ACDC's classes, to train and test segmenters without data.

Each slice: an elliptical left-ventricle cavity, the myocardium as a ring of varying thickness around it, the
right ventricle as a crescent against the septal side of the ring (absent in one slice in ten, as in apical
slices), all rotated, scaled and shifted at random; around the heart a body outline with a few organ-like
blobs over textured tissue, air outside. The image is piecewise-constant tissue intensities (bright blood,
dark myocardium, as in cine bSSFP) with texture, partial-volume blur, a smooth multiplicative bias field and
Rician noise, then z-scored per image (nnU-Net's MRI normalisation).

Sample i is drawn from `numpy.random.default_rng((seed, i))` alone, so any slice is reproducible without the
others. The `domain` only changes how the same draws become intensities: "shifted" is another scanner, with
the same hearts (a paired appearance shift) under another contrast (lower blood-myocardium contrast, organ
intensities inverted, a gamma curve), twice to three times the noise and a stronger bias field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.validate import check_int

__all__ = ["CLASSES", "DOMAINS", "make_slice", "make_slices", "make_split"]

CLASSES = ("background", "right ventricle", "myocardium", "left ventricle")  # ACDC's labels 0..3
MIN_SIZE = 16


@dataclass(frozen=True)
class _Scanner:
    """How a domain turns the drawn quantiles (uniform in [0, 1]) into intensities: ranges (low, high)."""

    blood: tuple[float, float]
    myocardium: tuple[float, float]
    tissue: tuple[float, float]
    invert_organs: bool
    gamma: tuple[float, float]
    noise: tuple[float, float]
    bias: float


_SCANNERS = {
    "source": _Scanner(blood=(0.75, 1.0), myocardium=(0.18, 0.32), tissue=(0.3, 0.5), invert_organs=False,
                       gamma=(1.0, 1.0), noise=(0.02, 0.05), bias=0.15),
    "shifted": _Scanner(blood=(0.6, 0.85), myocardium=(0.28, 0.4), tissue=(0.35, 0.5), invert_organs=True,
                        gamma=(0.6, 0.8), noise=(0.05, 0.09), bias=0.35),
}
DOMAINS = tuple(_SCANNERS)


def _between(q: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * q


def _gaussian_transfer(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """The Fourier transfer function of a Gaussian of `sigma` pixels, for numpy's rfft2 layout."""
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2 * math.pi**2 * sigma**2 * (fy**2 + fx**2))


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A smooth random field (white noise low-passed by a Gaussian of `sigma` pixels), zero mean, unit std."""
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((size, size))) * _gaussian_transfer((size, size), sigma),
                          s=(size, size))
    return (field - field.mean()) / field.std()


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (partial volume), reflect-padded so that the FFT's wrap-around does not mix opposite edges."""
    pad = math.ceil(3 * sigma) + 1
    padded = np.pad(image, pad, mode="reflect")
    blurred = np.fft.irfft2(np.fft.rfft2(padded) * _gaussian_transfer(padded.shape, sigma), s=padded.shape)
    return blurred[pad:-pad, pad:-pad]


def _ellipse(x: np.ndarray, y: np.ndarray, center: tuple[float, float], axes: tuple[float, float],
             angle: float) -> np.ndarray:
    """The mask of an ellipse with semi-axes `axes`, rotated by `angle`, in the normalised coordinates x, y."""
    dx, dy = x - center[0], y - center[1]
    c, s = math.cos(angle), math.sin(angle)
    return ((c * dx + s * dy) / axes[0]) ** 2 + ((-s * dx + c * dy) / axes[1]) ** 2 <= 1


def _heart(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The label map of one heart (0 background, 1 RV, 2 myocardium, 3 LV cavity) on the grid x, y in [-1, 1]."""
    center = rng.uniform(-0.15, 0.15, 2)
    angle, scale = rng.uniform(-math.pi / 5, math.pi / 5), rng.uniform(0.8, 1.25)
    lv_x = rng.uniform(0.16, 0.26)
    lv_y = lv_x * rng.uniform(0.8, 1.0)
    wall, wall_variation, wall_phase = rng.uniform(0.06, 0.11), rng.uniform(0.0, 0.3), rng.uniform(0, 2 * math.pi)
    has_rv = rng.random() >= 0.1
    rv_offset, rv_x, rv_y = rng.uniform(0.55, 0.85), rng.uniform(0.85, 1.25), rng.uniform(1.15, 1.5)
    # heart frame: the LV at the origin, the septum (and the RV) towards -u
    c, s = math.cos(angle), math.sin(angle)
    u = (c * (x - center[0]) + s * (y - center[1])) / scale
    v = (-s * (x - center[0]) + c * (y - center[1])) / scale
    lv = (u / lv_x) ** 2 + (v / lv_y) ** 2 <= 1
    thickness = wall * (1 + wall_variation * np.cos(np.arctan2(v, u) - wall_phase))
    outer = (u / (lv_x + thickness)) ** 2 + (v / (lv_y + thickness)) ** 2 <= 1
    labels = np.zeros(x.shape, dtype=np.int64)
    if has_rv:
        outer_x, outer_y = lv_x + wall, lv_y + wall
        rv = ((u + rv_offset * outer_x) / (rv_x * outer_x)) ** 2 + (v / (rv_y * outer_y)) ** 2 <= 1
        labels[rv & ~outer] = 1
    labels[outer & ~lv] = 2
    labels[lv] = 3
    return labels


def _check(size: int, seed: int, domain: str) -> None:
    check_int("size", size, MIN_SIZE)
    check_int("seed", seed, 0)
    if domain not in _SCANNERS:
        raise ValueError(f"domain: unknown domain {domain!r}. Allowed: {', '.join(DOMAINS)}")


def make_slice(index: int, size: int = 64, seed: int = 0, domain: str = "source") -> tuple[np.ndarray, np.ndarray]:
    """Slice `index`: (image float32 (1, size, size), z-scored; labels int64 (size, size) in 0..3)."""
    check_int("index", index, 0)
    _check(size, seed, domain)
    scanner = _SCANNERS[domain]
    rng = np.random.default_rng((seed, index))
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(grid, grid)
    labels = _heart(rng, x, y)

    # every draw below happens whatever the domain, so that both domains show the same slice
    body = _ellipse(x, y, rng.uniform(-0.05, 0.05, 2), (rng.uniform(0.85, 0.98), rng.uniform(0.7, 0.9)),
                    rng.uniform(-0.2, 0.2))
    image = np.zeros((size, size))
    image[body] = _between(rng.random(), scanner.tissue)
    for _ in range(rng.integers(3, 7)):
        organ = body & _ellipse(x, y, rng.uniform(-0.9, 0.9, 2), rng.uniform(0.1, 0.4, 2), rng.uniform(0, math.pi))
        level = 0.05 + 0.85 * rng.random()
        image[organ] = 0.95 - level if scanner.invert_organs else level
    image += 0.06 * body * _smooth_noise(rng, size, sigma=size / 16)
    blood = _between(rng.random(), scanner.blood)
    image[labels == 3] = blood
    image[labels == 1] = blood * rng.uniform(0.85, 1.0)
    image[labels == 2] = _between(rng.random(), scanner.myocardium)
    image = np.clip(_blur(image, rng.uniform(0.5, 1.0)), 0, None)
    image **= _between(rng.random(), scanner.gamma)
    image *= np.exp(scanner.bias * _smooth_noise(rng, size, sigma=size / 3))
    sigma = _between(rng.random(), scanner.noise)
    real, imaginary = rng.standard_normal((2, size, size)) * sigma
    image = np.hypot(image + real, imaginary)  # Rician: the magnitude of a complex signal with Gaussian noise
    image = (image - image.mean()) / image.std()
    return image[None].astype(np.float32), labels


def make_slices(n: int, size: int = 64, seed: int = 0, domain: str = "source",
                start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Slices start .. start+n-1: (images float32 (n, 1, size, size), labels int64 (n, size, size))."""
    check_int("n", n, 0)
    check_int("start", start, 0)
    _check(size, seed, domain)
    images = np.empty((n, 1, size, size), dtype=np.float32)
    labels = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        images[i], labels[i] = make_slice(start + i, size=size, seed=seed, domain=domain)
    return images, labels


def make_split(n_train: int = 200, n_val: int = 50, n_test: int = 100, size: int = 64,
               seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint train / val / test slices of the source domain (consecutive indices), and "test_shifted": the
    test slices seen by the shifted scanner, so that the gap between the two test sets is the domain shift alone."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_int(name, value, 0)
    starts = {"train": 0, "val": n_train, "test": n_train + n_val}
    counts = {"train": n_train, "val": n_val, "test": n_test}
    split = {name: make_slices(counts[name], size=size, seed=seed, start=starts[name]) for name in starts}
    split["test_shifted"] = make_slices(n_test, size=size, seed=seed, domain="shifted", start=starts["test"])
    return split
