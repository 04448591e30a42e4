"""Domain suites for domain generalization: named domains of the same classes, for leave-one-domain-out
(`testbeds.protocol`), as in DomainBed (Gulrajani & Lopez-Paz, ICLR 2021, "In Search of Lost Domain
Generalization", facebookresearch/DomainBed `domainbed/datasets.py`).

Suites (`SUITES`, built by `load_suite(name, **options)`):
- "rotated-digits": DomainBed's RotatedMNIST on the embedded 8x8 digits: the 1,797 images split
  into disjoint seeded subsets, one per angle (0, 15, 30, 45, 60, 75 degrees), each rotated by its
  angle counter-clockwise (bilinear, zero fill). The digits fill their 8x8 frame, so rotations clip
  corners more than on MNIST's 28x28.
- "mnist1d-domains": five MNIST-1D generator settings (`MNIST1D_DOMAIN_SHIFTS`), each with its own
  generator seed; every domain is standardised by the generator on its own.
- "domainbed-folder": DomainBed's image-folder layout `<root>/<domain>/<class>/<image>` (PACS, VLCS,
  OfficeHome, TerraIncognita), read with PIL, converted to RGB and resized to image_size x image_size
  (bilinear, as DomainBed's `transforms.Resize((224, 224))`), normalised with the ImageNet statistics.
  DomainBed's train-time augmentation (random resized crop, flip, colour jitter, grayscale) is not
  applied here.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array3D, ClassLabel, Dataset, Features, concatenate_datasets
from torch import Tensor

from shared.digits import digits_tensors
from shared.registry import Registry
from shared.seeding import derive_seed
from testbeds.mnist1d import MNIST1D_DEFAULTS, NUM_CLASSES, generate_mnist1d, signal_dataset
from testbeds.sources import decode_images, label_column

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DomainBed's normalisation
ROTATION_ANGLES = (0, 15, 30, 45, 60, 75)  # DomainBed's RotatedMNIST environments
# torchvision ImageFolder's extensions (case-insensitive); other files and hidden names (".*", e.g. the
# "._x.jpg" AppleDouble files of archives made on macOS) are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
READ_CHUNK = 256  # images decoded per Arrow chunk: the peak memory is the data set plus one chunk

# MNIST-1D domains: the generator arguments each domain changes from the defaults.
MNIST1D_DOMAIN_SHIFTS: dict[str, dict[str, Any]] = {
    "base": {},
    "noisy": {"corr_noise_scale": 0.5, "iid_noise_scale": 0.1},
    "sheared": {"shear_scale": 1.5},
    "scaled": {"scale_coeff": 1.0},
    "shifted": {"max_translation": 72},  # template_len + padding[1]: any circular shift
}


@dataclass(frozen=True)
class DomainSuite:
    """Domains of the same classes; pixels become model inputs as (pixels / pixel_max - mean) / std, or,
    for suites of text, through `encode` (a domain's Dataset -> an integer tensor of token ids)."""

    name: str
    domains: dict[str, Dataset]  # domain name -> Dataset with "image" (or text) and "label" (ClassLabel)
    num_classes: int
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    definitions: dict[str, str]  # each domain's definition, recorded in results
    encode: Callable[[Dataset], Tensor] | None = None  # text suites: the inputs of a domain (testbeds.text)


SUITES: Registry[Callable[..., DomainSuite]] = Registry("domain suite")
SUITES.register("xnli", target="testbeds.text:xnli_suite")  # lazy: tokenizers load only when used


def load_suite(name: str, **options: Any) -> DomainSuite:
    """The suite `name` built with `options`; an unknown name, an unknown or missing option, or a bad
    value is a ValueError that names the field."""
    builder = SUITES.get(name, "suite")
    params = {k: p for k, p in inspect.signature(builder).parameters.items() if p.kind is p.KEYWORD_ONLY}
    for key in options:
        if key not in params:
            raise ValueError(f"{key}: unknown option of domain suite '{name}'. Allowed: {', '.join(params) or 'none'}")
    for key, param in params.items():
        if param.default is param.empty and key not in options:
            raise ValueError(f"{key}: domain suite '{name}' needs this option")
    return builder(**options)


def suite_tensors(suite: DomainSuite, domain: str) -> tuple[Tensor, Tensor]:
    """One domain as model inputs: x float32 (N, *shape) normalised per channel, y int64 (N,)."""
    if domain not in suite.domains:
        raise ValueError(f"domain: suite '{suite.name}' has no domain {domain!r}. Allowed: {', '.join(suite.domains)}")
    ds = suite.domains[domain]
    x = suite.encode(ds) if suite.encode is not None else decode_images(ds, suite.pixel_max, suite.mean, suite.std)
    return x, torch.from_numpy(label_column(ds))


def _check_int(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ValueError(f"{name}: expected an integer{'' if low is None else f' >= {low}'}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------- rotated digits
def rotate(images: Tensor, degrees: float) -> Tensor:
    """Images (N, C, H, W) rotated counter-clockwise by `degrees` about their centre, bilinear with
    zero fill, as torchvision's `rotate` (no torchvision here): `affine_grid`/`grid_sample` with
    align_corners=False (PIL's centre convention), computed in float64 so that multiples of 90
    degrees are exact permutations of the pixels."""
    a = math.radians(degrees)
    # grid_sample pulls: output pixel q reads input R^-1 q; with y pointing down, this R turns counter-clockwise.
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=torch.float64)
    x = images.to(torch.float64)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


def split_domains(n: int, num_domains: int, seed: int) -> list[Tensor]:
    """Disjoint index sets covering range(n), one per domain, as DomainBed's RotatedMNIST does
    (a seeded permutation, every num_domains-th index to one domain); each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "domains")))
    return [order[k::num_domains].sort().values for k in range(num_domains)]


@SUITES.register("rotated-digits")
def rotated_digits(*, angles: Sequence[float] = ROTATION_ANGLES, seed: int = 0) -> DomainSuite:
    """The embedded digits split into disjoint subsets, subset k rotated by angles[k] (domain name: the angle)."""
    if isinstance(angles, (str, bytes)) or not isinstance(angles, Sequence) or len(angles) < 2 or not all(
        not isinstance(a, bool) and isinstance(a, (int, float)) and math.isfinite(a) for a in angles
    ):
        raise ValueError(f"angles: expected a list of at least 2 finite angles in degrees, got {angles!r}")
    names = [f"{a:g}" for a in angles]
    if len(set(names)) < len(names):
        raise ValueError(f"angles: each angle names a domain, so they must differ, got {list(angles)!r}")
    seed = _check_int("seed", seed)
    x, y = digits_tensors()
    features = Features({"image": Array3D(shape=tuple(x.shape[1:]), dtype="float32"), "label": ClassLabel(num_classes=10)})
    domains, definitions = {}, {}
    for name, angle, idx in zip(names, angles, split_domains(len(y), len(angles), seed), strict=True):
        images = rotate(x[idx], float(angle))
        domains[name] = Dataset.from_dict({"image": images.numpy(), "label": y[idx].numpy()}, features=features)
        definitions[name] = (
            f"{len(idx)} of the 1797 scikit-learn digits (disjoint seeded subset {names.index(name) + 1} of "
            f"{len(names)}, seed {seed}) rotated {angle:g} degrees counter-clockwise (bilinear, zero fill)"
        )
    return DomainSuite("rotated-digits", domains, 10, 1.0, (0.0,), (1.0,), definitions)


# ------------------------------------------------------------------------------------ MNIST-1D domains
@SUITES.register("mnist1d-domains")
def mnist1d_domains(*, num_samples: int = 2000, seed: int = 0, data_dir: str | None = None) -> DomainSuite:
    """Five MNIST-1D generator settings (`MNIST1D_DOMAIN_SHIFTS`) of `num_samples` each (a multiple of
    10: the generator makes num_samples // 10 per class), each with the generator seed
    derive_seed(seed, "mnist1d-domains", domain) mod 2**32; `data_dir` is the cache folder."""
    num_samples = _check_int("num_samples", num_samples, NUM_CLASSES)
    if num_samples % NUM_CLASSES:
        raise ValueError(f"num_samples: expected a multiple of {NUM_CLASSES} (samples per domain), got {num_samples}")
    seed = _check_int("seed", seed)
    domains, definitions = {}, {}
    for name, shift in MNIST1D_DOMAIN_SHIFTS.items():
        domain_seed = derive_seed(seed, "mnist1d-domains", name) % 2**32
        arrays = generate_mnist1d(data_dir, **shift, num_samples=num_samples, seed=domain_seed)
        x = np.concatenate([arrays.x_train, arrays.x_test])  # the whole domain: the protocol splits it
        y = np.concatenate([arrays.y_train, arrays.y_test])
        domains[name] = signal_dataset(x, y)
        changes = ", ".join(f"{k}={v} (default {MNIST1D_DEFAULTS[k]})" for k, v in shift.items())
        definitions[name] = (
            f"mnist1d generator defaults{' with ' + changes if changes else ''}; "
            f"num_samples={num_samples}, seed={domain_seed}"
        )
    return DomainSuite("mnist1d-domains", domains, NUM_CLASSES, 1.0, (0.0,), (1.0,), definitions)


# ---------------------------------------------------------------------------------- DomainBed folders
def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size): RGB, resized bilinearly; an unreadable file names itself."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"root: cannot read the image {path} ({error})") from error
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


@SUITES.register("domainbed-folder")
def domainbed_folder(*, root: str, image_size: int = 224) -> DomainSuite:
    """The domains (sorted folder names) and classes (the sorted union of class folder names) of a
    DomainBed image folder; every domain must have every class folder, each holding images."""
    if not isinstance(root, (str, os.PathLike)) or not Path(root).is_dir():
        raise ValueError(f"root: expected the folder <root>/<domain>/<class>/<image>, got {root!r}")
    image_size = _check_int("image_size", image_size, 1)
    base = Path(root)
    domain_dirs = [p for p in _visible(base) if p.is_dir()]
    if len(domain_dirs) < 2:
        raise ValueError(f"root: {base} has {len(domain_dirs)} domain folder(s); expected at least 2 "
                         "(layout <root>/<domain>/<class>/<image>)")
    class_dirs = {d.name: {c.name for c in _visible(d) if c.is_dir()} for d in domain_dirs}
    classes = sorted(set().union(*class_dirs.values()))
    if len(classes) < 2:
        raise ValueError(f"root: {base} has {len(classes)} class folder(s) per domain; expected at least 2")
    for domain, present in class_dirs.items():
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"root: domain '{domain}' lacks the class folder(s) {', '.join(missing)} "
                             f"(every domain needs every class: {', '.join(classes)})")

    features = Features({"image": Array3D(shape=(3, image_size, image_size), dtype="uint8"),
                         "label": ClassLabel(names=classes)})
    domains, definitions = {}, {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for folder in domain_dirs:
            files: list[tuple[Path, int]] = []
            for label, cls in enumerate(classes):
                images = sorted(p for p in (folder / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                                and not any(part.startswith(".") for part in p.relative_to(folder / cls).parts))
                if not images:
                    raise ValueError(f"root: {folder / cls} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
                files += [(p, label) for p in images]
            chunks = []
            for start in range(0, len(files), READ_CHUNK):
                part = files[start : start + READ_CHUNK]
                pixels = np.stack(list(pool.map(lambda item: _read_image(item[0], image_size), part)))
                chunks.append(Dataset.from_dict({"image": pixels, "label": [lab for _, lab in part]}, features=features))
            domains[folder.name] = concatenate_datasets(chunks)
            definitions[folder.name] = (
                f"{folder}: {len(files)} images of classes {', '.join(classes)}, RGB, resized to "
                f"{image_size}x{image_size} (PIL bilinear)"
            )
    return DomainSuite("domainbed-folder", domains, len(classes), 255.0, IMAGENET_MEAN, IMAGENET_STD, definitions)
