"""ACDC (cine-MRI, 4 classes as `seg.synthetic.CLASSES`) in nnU-Net v2's raw layout, as 2D short-axis slices.

The layout is UU-Mamba's `data/nnUNet-raw/Dataset027_ACDC`: `dataset.json` (`channel_names`, `labels`
{background 0, RV 1, MLV 2, LVC 3}, `numTraining`, `file_ending`), `imagesTr/<case>_0000.nii.gz` and
`labelsTr/<case>.nii.gz` with cases `patient001_frame01` (one end-diastolic and one end-systolic frame per
patient), and optionally `imagesTs/labelsTs` (the challenge's test patients). A volume is (H, W, slices) as
stored, without reorientation: the networks do not care, and ACDC's slices then look transposed next to the
scanner's view.

`load_slices` turns volumes into arrays with `seg.synthetic.make_slices`' conventions (images float32 (n, 1, size,
size), labels int64 (n, size, size)): each volume is z-scored over all its voxels (nnU-Net's MRI normalisation,
per image), each slice centre-cropped or padded to a square, then resampled to `size` (bilinear images, nearest
labels). `split_cases` splits by patient, so the two frames of a patient never straddle train and test.
`write_tiny_acdc` writes a few synthetic patients in this layout for tests and demos.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# nibabel rather than MONAI's LoadImage: it is the field's NIfTI reader (MONAI, nnU-Net and ACDC's own scripts
# use it underneath), and reading the array and the voxel size is all this needs, without MONAI's import cost
# and transform machinery
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.filebasedimages import ImageFileError

from seg.synthetic import MIN_SIZE, make_slice
from shared.validate import check_int

__all__ = ["ACDC_LABELS", "AcdcCase", "AcdcDataset", "AcdcSlices", "load_case", "load_slices", "open_acdc",
           "patient_of", "split_cases", "volume_to_slices", "write_tiny_acdc"]

ACDC_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}  # UU-Mamba's Dataset027_ACDC/dataset.json
FILE_ENDINGS = (".nii.gz", ".nii")
# everything nibabel raises on a truncated, corrupt or non-NIfTI file
_NIFTI_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError)


@dataclass(frozen=True)
class AcdcDataset:
    """An opened dataset folder: its dataset.json fields and its labelled cases, training and test."""

    root: Path
    labels: Mapping[str, int]
    channel_names: Mapping[str, str]
    file_ending: str
    training: tuple[str, ...]
    test: tuple[str, ...]
    files: Mapping[str, tuple[Path, Path]] = field(repr=False)  # case -> (image, label)


@dataclass(frozen=True)
class AcdcCase:
    """One volume as stored: image float32 (H, W, slices), label int64 of the same shape, voxel size in mm."""

    case: str
    patient: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class AcdcSlices:
    """Slices of several cases: images float32 (n, 1, size, size), labels int64 (n, size, size), pixel size in mm
    after resampling (n, 2) (HD95 in mm needs it), and where each slice comes from (case, slice index)."""

    images: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray
    cases: tuple[str, ...]
    slice_index: np.ndarray


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder")
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (an nnU-Net raw dataset folder holds dataset.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")  # noqa: TRY004 - bad input
    missing = [key for key in ("channel_names", "labels", "numTraining", "file_ending") if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing field '{missing[0]}'")
    return meta


def _check_meta(path: Path, meta: dict) -> None:
    """The dataset.json fields this loader relies on: one channel, labels 0..n-1 with background 0, NIfTI files."""
    if not isinstance(meta["channel_names"], dict) or len(meta["channel_names"]) != 1:
        raise ValueError(f"{path}: channel_names: expected one channel (images are (n, 1, H, W)), got "
                         f"{meta['channel_names']!r}")
    labels = meta["labels"]
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: labels: expected a mapping of names to values, got {labels!r}")  # noqa: TRY004
    regions = [name for name, value in labels.items() if isinstance(value, bool) or not isinstance(value, int)]
    if regions:
        raise ValueError(f"{path}: labels.{regions[0]}: expected an integer label value (region-based labels are "
                         f"not supported), got {labels[regions[0]]!r}")
    if labels.get("background") != 0 or sorted(labels.values()) != list(range(len(labels))):
        raise ValueError(f"{path}: labels: expected values 0..{len(labels) - 1} with background 0, got {labels!r}")
    if meta["file_ending"] not in FILE_ENDINGS:
        raise ValueError(f"{path}: file_ending: expected one of {', '.join(FILE_ENDINGS)}, got "
                         f"{meta['file_ending']!r}")
    count = meta["numTraining"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{path}: numTraining: expected an integer >= 0, got {count!r}")


def _list_cases(images: Path, labels: Path, ending: str) -> dict[str, tuple[Path, Path]]:
    """Cases of `images/<case>_0000<ending>`, each with its `labels/<case><ending>`."""
    cases = {}
    for image in sorted(_folder(images).iterdir()):
        if not image.name.endswith(ending):
            continue  # not an image of this dataset (.DS_Store and the like)
        stem = image.name[: -len(ending)]
        if not stem.endswith("_0000"):
            raise ValueError(f"{image}: expected <case>_0000{ending} (one channel in dataset.json)")
        label = labels / f"{stem[:-5]}{ending}"
        if not label.is_file():
            raise ValueError(f"{label}: no such file (the label of {image.name})")
        cases[stem[:-5]] = (image, label)
    return cases


def open_acdc(root: str | Path) -> AcdcDataset:
    """Read `root/dataset.json` and list the cases of imagesTr, and of imagesTs when labelsTs exists (the test
    images of an nnU-Net dataset often come without labels; those cannot be evaluated and are not listed)."""
    root = _folder(Path(root))
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path)
    _check_meta(meta_path, meta)
    ending = meta["file_ending"]
    training = _list_cases(root / "imagesTr", _folder(root / "labelsTr"), ending)
    if len(training) != meta["numTraining"]:
        raise ValueError(f"{meta_path}: numTraining is {meta['numTraining']} but {root / 'imagesTr'} holds "
                         f"{len(training)} cases")
    test = {}
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        test = _list_cases(root / "imagesTs", root / "labelsTs", ending)
        both = sorted(set(training) & set(test))
        if both:
            raise ValueError(f"{root / 'imagesTs'}: case {both[0]} is also in imagesTr")
    return AcdcDataset(root=root, labels=dict(meta["labels"]), channel_names=dict(meta["channel_names"]),
                       file_ending=ending, training=tuple(training), test=tuple(test), files={**training, **test})


def patient_of(case: str) -> str:
    """The patient of an ACDC case id (`patient001_frame01` -> `patient001`); an id without `_frameNN` is its own
    patient."""
    match = re.fullmatch(r"(.+)_frame\d+", case)
    return match.group(1) if match else case


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The array as stored (labels keep their integer type) and the voxel size; a ValueError naming the file if
    nibabel cannot read it."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except _NIFTI_ERRORS as exc:
        raise ValueError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume (H, W, slices), got shape {data.shape}")
    return data, zooms[:3]


def _check_label(path: Path, label: np.ndarray, labels: Mapping[str, int]) -> np.ndarray:
    """The label as int64, or a ValueError naming the file and the first value outside dataset.json's labels."""
    if not np.issubdtype(label.dtype, np.integer):
        fractional = ~np.isfinite(label) | (label != np.round(label))
        if fractional.any():
            raise ValueError(f"{path}: label value {label[fractional].flat[0]} is not an integer")
    values = np.unique(label).astype(np.int64)
    unknown = values[~np.isin(values, list(labels.values()))]
    if unknown.size:
        known = ", ".join(f"{name} {value}" for name, value in labels.items())
        raise ValueError(f"{path}: label value {unknown[0]} not in dataset.json's labels ({known})")
    return label.astype(np.int64)


def load_case(dataset: AcdcDataset, case: str) -> AcdcCase:
    """Load one case's image and label (checked against dataset.json's labels, the image's shape and spacing)."""
    if case not in dataset.files:
        raise ValueError(f"case: unknown case {case!r} in {dataset.root}")
    image_path, label_path = dataset.files[case]
    image, spacing = _read_nifti(image_path)
    label, label_spacing = _read_nifti(label_path)
    if label.shape != image.shape:
        raise ValueError(f"{label_path}: label shape {label.shape} differs from the image's {image.shape} "
                         f"({image_path.name})")
    if not np.allclose(label_spacing, spacing, rtol=1e-4):
        raise ValueError(f"{label_path}: voxel size {label_spacing} differs from the image's {spacing} "
                         f"({image_path.name})")
    return AcdcCase(case=case, patient=patient_of(case), image=image.astype(np.float32),
                    label=_check_label(label_path, label, dataset.labels), spacing=spacing)


def _crop_or_pad(array: np.ndarray, side: int, fill: float) -> np.ndarray:
    """(slices, H, W) centre-cropped or padded with `fill` to (slices, side, side); the odd pixel goes to the end."""
    out = np.full(array.shape[:1] + (side, side), fill, dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for n in array.shape[1:]:
        if n >= side:
            start = (n - side) // 2
            src.append(slice(start, start + side))
            dst.append(slice(None))
        else:
            start = (side - n) // 2
            src.append(slice(None))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = array[tuple(src)]
    return out


def volume_to_slices(image: np.ndarray, label: np.ndarray, size: int = 128, side: int | None = None,
                     spacing: Sequence[float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A volume (H, W, slices) as slices: images float32 (slices, 1, size, size) z-scored over the volume, labels
    int64 (slices, size, size), and the in-plane pixel size after resampling (from `spacing`, the input's).
    Each slice is centre-cropped or padded to side x side (default max(H, W): nothing is cut off, the aspect
    ratio is kept), then resampled: bilinear for the image, nearest for the label. Images are padded with the
    volume's minimum (the air of a magnitude image: padding then looks like the background around the body, not
    a band of mean intensity), labels with background."""
    check_int("size", size, 1)
    if image.ndim != 3 or label.shape != image.shape:
        raise ValueError(f"image {image.shape} and label {label.shape}: expected the same (H, W, slices) shape")
    side = max(image.shape[:2]) if side is None else side
    check_int("side", side, 1)
    values = image.astype(np.float64)
    # nnU-Net's ZScoreNormalization: statistics of the whole volume, std floored so a constant volume gives zeros
    normalised = (values - values.mean()) / max(values.std(), 1e-8)
    images = _crop_or_pad(normalised.transpose(2, 0, 1), side, fill=normalised.min())
    labels = _crop_or_pad(label.transpose(2, 0, 1), side, fill=0)
    # as float32 (slices, 1, side, side), the layout interpolate takes; label values are small integers, exact in float32
    images, labels = (torch.from_numpy(a[:, None].astype(np.float32)) for a in (images, labels))
    if side != size:
        # antialias: downsampling ACDC's ~256-pixel slices by 2 would alias the noise without a low-pass filter;
        # "nearest-exact" samples at pixel centres as bilinear does ("nearest" is shifted by half a pixel)
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        labels = F.interpolate(labels, size=(size, size), mode="nearest-exact")
    scale = side / size
    return (images.numpy(), labels[:, 0].numpy().astype(np.int64),
            (float(spacing[0]) * scale, float(spacing[1]) * scale))


def load_slices(dataset: AcdcDataset, cases: Sequence[str], size: int = 128, side: int | None = None) -> AcdcSlices:
    """All short-axis slices of `cases`, in order, as `volume_to_slices` makes them."""
    check_int("size", size, 1)
    # each list starts with an empty array, so that no cases give empty arrays of the right shapes
    images, labels = [np.empty((0, 1, size, size), np.float32)], [np.empty((0, size, size), np.int64)]
    spacing, slice_index, slice_cases = [np.empty((0, 2))], [np.empty(0, np.int64)], []
    for case in cases:
        volume = load_case(dataset, case)
        case_images, case_labels, pixel = volume_to_slices(volume.image, volume.label, size=size, side=side,
                                                           spacing=volume.spacing[:2])
        n = len(case_images)
        images.append(case_images)
        labels.append(case_labels)
        spacing.append(np.tile(pixel, (n, 1)))
        slice_index.append(np.arange(n))
        slice_cases += [case] * n
    return AcdcSlices(images=np.concatenate(images), labels=np.concatenate(labels), spacing=np.concatenate(spacing),
                      cases=tuple(slice_cases), slice_index=np.concatenate(slice_index))


def split_cases(cases: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Cases split into "train", "val", "test" by patient (`patient_of`): a seeded permutation of the sorted
    patients, round(fraction * patients) of them (halves up) for val and test, the rest for train. The default
    70/10/20 is the usual ACDC split of the 2D literature (UU-Mamba itself trains on all 100 training patients and
    tests on the challenge's 50). The same cases and seed give the same split, whatever the order of `cases`."""
    check_int("seed", seed, 0)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    patients = sorted({patient_of(case) for case in cases})
    n_val, n_test = (math.floor(f * len(patients) + 0.5) for f in (val_fraction, test_fraction))
    if n_val + n_test >= len(patients):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction}: {n_val} + {n_test} of "
                         f"{len(patients)} patients leave none for training")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    groups = {"val": set(order[:n_val]), "test": set(order[n_val:n_val + n_test]), "train": set(order[n_val + n_test:])}
    return {name: tuple(sorted(c for c in cases if patient_of(c) in groups[name])) for name in ("train", "val", "test")}


def _write_nifti(path: Path, data: np.ndarray, spacing: tuple[float, float, float]) -> None:
    image = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))  # the affine sets pixdim, as a scanner's export does
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def write_tiny_acdc(root: str | Path, patients: int = 3, frames: int = 2, shape: tuple[int, int, int] = (24, 20, 3),
                    test_patients: int = 1, seed: int = 0,
                    spacing: tuple[float, float, float] = (1.5625, 1.5625, 10.0)) -> Path:
    """Write `root/Dataset027_ACDC` in ACDC's nnU-Net layout, UU-Mamba's dataset.json, and return its path:
    `patients` training patients (`test_patients` more in imagesTs/labelsTs), `frames` frames each, volumes of
    `shape` with ACDC's typical voxel size. Slices are `seg.synthetic.make_slice` hearts, centre-cropped to
    (H, W), with MRI-like int16 intensities and uint8 labels 0..3."""
    for name, value, low in (("patients", patients, 1), ("frames", frames, 1), ("test_patients", test_patients, 0),
                             ("seed", seed, 0)):
        check_int(name, value, low)
    if len(shape) != 3:
        raise ValueError(f"shape: expected (H, W, slices), got {shape!r}")
    for value in shape:
        check_int("shape", value, 1)
    height, width, depth = shape
    folder = Path(root) / "Dataset027_ACDC"
    subsets = {"Tr": range(1, patients + 1), "Ts": range(patients + 1, patients + test_patients + 1)}
    index = 0
    for subset, numbers in subsets.items():
        if not numbers:
            continue
        (folder / f"images{subset}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{subset}").mkdir(parents=True, exist_ok=True)
        for number in numbers:
            for frame in range(1, frames + 1):
                grid = max(height, width, MIN_SIZE)
                image = np.empty((grid, grid, depth), dtype=np.int16)
                label = np.empty((grid, grid, depth), dtype=np.uint8)
                for z in range(depth):
                    slice_image, slice_label = make_slice(index, size=grid, seed=seed)
                    image[:, :, z] = np.clip(300 + 100 * slice_image[0], 0, None).round()  # z-scored -> counts
                    label[:, :, z] = slice_label
                    index += 1
                top, left = (grid - height) // 2, (grid - width) // 2
                case = f"patient{number:03d}_frame{frame:02d}"
                crop = (slice(top, top + height), slice(left, left + width))
                _write_nifti(folder / f"images{subset}" / f"{case}_0000.nii.gz", image[crop], spacing)
                _write_nifti(folder / f"labels{subset}" / f"{case}.nii.gz", label[crop], spacing)
    meta = {"channel_names": {"0": "cineMRI"}, "labels": ACDC_LABELS, "numTraining": patients * frames,
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
    return folder
