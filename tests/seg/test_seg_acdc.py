"""The ACDC loader on a tiny written dataset: the round trip, slicing conventions, the per-patient split, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg.acdc import (
    ACDC_LABELS,
    AcdcDataset,
    load_case,
    load_slices,
    open_acdc,
    patient_of,
    split_cases,
    volume_to_slices,
    write_tiny_acdc,
)
from seg.synthetic import make_slice

SPACING = (1.5625, 1.5625, 10.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> AcdcDataset:
    return open_acdc(write_tiny_acdc(tmp_path_factory.mktemp("acdc")))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A one-case dataset to break, one test at a time."""
    return write_tiny_acdc(tmp_path, patients=1, frames=1, test_patients=0)


def test_write_then_open_lists_the_cases_and_reads_dataset_json(tiny: AcdcDataset) -> None:
    assert tiny.root.name == "Dataset027_ACDC"
    assert tiny.training == tuple(f"patient00{p}_frame0{f}" for p in (1, 2, 3) for f in (1, 2))
    assert tiny.test == ("patient004_frame01", "patient004_frame02")
    assert tiny.labels == ACDC_LABELS == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
    assert tiny.channel_names == {"0": "cineMRI"} and tiny.file_ending == ".nii.gz"
    meta = json.loads((tiny.root / "dataset.json").read_text())
    assert meta["numTraining"] == 6
    assert (tiny.root / "imagesTr" / "patient001_frame01_0000.nii.gz").is_file()
    assert (tiny.root / "labelsTs" / "patient004_frame02.nii.gz").is_file()


def test_a_case_round_trips_with_its_voxel_size_and_labels(tiny: AcdcDataset) -> None:
    case = load_case(tiny, "patient001_frame02")
    assert case.patient == "patient001" and case.spacing == SPACING
    assert case.image.shape == case.label.shape == (24, 20, 3)
    assert case.image.dtype == np.float32 and case.label.dtype == np.int64
    assert nib.load(tiny.files["patient001_frame02"][0]).header.get_xyzt_units()[0] == "mm"
    # patient001_frame02 holds the synthetic slices 3, 4, 5 (24 x 24), centre-cropped to 20 columns
    for z in range(3):
        image, label = make_slice(3 + z, size=24, seed=0)
        np.testing.assert_array_equal(case.label[:, :, z], label[:, 2:22])
        np.testing.assert_array_equal(case.image[:, :, z], np.clip(300 + 100 * image[0], 0, None).round()[:, 2:22])
    labels = np.concatenate([load_case(tiny, c).label.ravel() for c in tiny.training])
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_slices_follow_make_slices_conventions(tiny: AcdcDataset) -> None:
    slices = load_slices(tiny, ("patient002_frame01", "patient003_frame02"), size=32)
    assert slices.images.shape == (6, 1, 32, 32) and slices.images.dtype == np.float32
    assert slices.labels.shape == (6, 32, 32) and slices.labels.dtype == np.int64
    assert slices.cases == ("patient002_frame01",) * 3 + ("patient003_frame02",) * 3
    np.testing.assert_array_equal(slices.slice_index, [0, 1, 2, 0, 1, 2])
    # 24 x 20 padded to 24 x 24, then 24 -> 32 pixels: 1.5625 * 24 / 32 mm
    np.testing.assert_allclose(slices.spacing, np.full((6, 2), 1.171875))
    assert set(np.unique(slices.labels)) <= {0, 1, 2, 3}
    empty = load_slices(tiny, (), size=32)
    assert empty.images.shape == (0, 1, 32, 32) and empty.labels.shape == (0, 32, 32) and empty.spacing.shape == (0, 2)


def test_volume_is_z_scored_as_a_whole_and_padded_around_the_centre() -> None:
    image = np.array([[[1.0, 5.0], [2.0, 6.0]], [[3.0, 7.0], [4.0, 8.0]]])  # (H 2, W 2, slices 2)
    label = np.zeros((2, 2, 2), dtype=np.int64)
    images, _, spacing = volume_to_slices(image, label, size=2, spacing=(1.5, 1.5))
    values = np.arange(1.0, 9.0)
    expected = (image - values.mean()) / values.std()
    np.testing.assert_allclose(images[:, 0], expected.transpose(2, 0, 1), rtol=1e-6)
    assert images[0].mean() < -0.5 < 0.5 < images[1].mean()  # per volume, not per slice
    assert spacing == (1.5, 1.5)

    tall = np.arange(8).reshape(4, 2, 1)  # (H 4, W 2): padded to 4 x 4, one column each side
    padded_image, padded, spacing = volume_to_slices(tall + 10.0, tall, size=4, spacing=(2.0, 2.0))
    np.testing.assert_array_equal(padded[0], [[0, 0, 1, 0], [0, 2, 3, 0], [0, 4, 5, 0], [0, 6, 7, 0]])
    z = (np.arange(8.0) - 3.5) / np.arange(8.0).std()
    np.testing.assert_allclose(padded_image[0, 0, :, 1:3].ravel(), z, rtol=1e-6)
    np.testing.assert_allclose(padded_image[0, 0, :, [0, 3]], z.min())  # the volume's minimum (air), not 0
    _, cropped, spacing = volume_to_slices(np.ones((4, 2, 1)), tall, size=2, side=2, spacing=(2.0, 2.0))
    np.testing.assert_array_equal(cropped[0], [[2, 3], [4, 5]])  # the central two rows
    assert spacing == (2.0, 2.0)


def test_resampling_is_bilinear_for_images_and_nearest_for_labels() -> None:
    image = np.array([[0.0, 1.0], [2.0, 3.0]])[:, :, None]
    label = np.array([[0, 1], [2, 3]])[:, :, None]
    images, labels, spacing = volume_to_slices(image, label, size=4, spacing=(1.0, 1.0))
    np.testing.assert_array_equal(labels[0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    z = (image[:, :, 0] - 1.5) / np.sqrt(1.25)
    # output pixel 1 sits at input coordinate 0.25 (pixel centres): 0.75 of pixel 0, 0.25 of pixel 1
    assert images[0, 0, 0, 0] == pytest.approx(z[0, 0])
    assert images[0, 0, 1, 1] == pytest.approx(0.75 * (0.75 * z[0, 0] + 0.25 * z[0, 1]) +
                                               0.25 * (0.75 * z[1, 0] + 0.25 * z[1, 1]), rel=1e-6)
    assert spacing == (0.5, 0.5)


def test_split_is_by_patient_seeded_and_order_free() -> None:
    cases = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 11) for f in (1, 12)]
    split = split_cases(cases, seed=4)
    patients = {name: {patient_of(c) for c in subset} for name, subset in split.items()}
    assert [len(patients[n]) for n in ("train", "val", "test")] == [7, 1, 2]  # 70 / 10 / 20 of 10 patients
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert sorted(c for subset in split.values() for c in subset) == sorted(cases)
    assert all(len(subset) == 2 * len(patients[n]) for n, subset in split.items())  # both frames go together
    assert split_cases(cases[::-1], seed=4) == split
    assert any(split_cases(cases, seed=s) != split for s in range(5))
    assert patient_of("patient042_frame07") == "patient042" and patient_of("case7") == "case7"


def test_split_errors_name_the_argument() -> None:
    cases = [f"patient{p:03d}_frame01" for p in range(1, 4)]
    with pytest.raises(ValueError, match="val_fraction: expected a number in"):
        split_cases(cases, val_fraction=1.0)
    with pytest.raises(ValueError, match="leave none for training"):
        split_cases(cases, val_fraction=0.5, test_fraction=0.4)


def test_missing_folder_and_dataset_json_name_the_path(tmp_path: Path, small: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder")):
        open_acdc(tmp_path / "nowhere")
    (small / "dataset.json").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{small / 'dataset.json'}: no such file")):
        open_acdc(small)


def test_missing_labels_folder_or_file_name_the_path(small: Path) -> None:
    label = small / "labelsTr" / "patient001_frame01.nii.gz"
    label.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{label}: no such file")):
        open_acdc(small)
    label.parent.rmdir()
    with pytest.raises(ValueError, match=re.escape(f"{label.parent}: no such folder")):
        open_acdc(small)


def _edit_meta(key: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_edit_meta("labels", None), "missing field 'labels'"),
    (_edit_meta("labels", {"background": 0, "heart": [1, 2]}), "labels.heart: expected an integer label value"),
    (_edit_meta("labels", {"background": 0, "RV": 2}), "labels: expected values 0..1 with background 0"),
    (_edit_meta("channel_names", {"0": "cine", "1": "T1"}), "channel_names: expected one channel"),
    (_edit_meta("file_ending", ".mha"), "file_ending: expected one of .nii.gz, .nii"),
    (_edit_meta("numTraining", 200), "numTraining is 200 but .* holds 1 cases"),
])
def test_bad_dataset_json_names_the_file_and_field(small: Path, edit: Callable[[dict], None], message: str) -> None:
    meta_path = small / "dataset.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(str(meta_path)) + ".*" + message):
        open_acdc(small)


def test_label_value_outside_dataset_json_names_the_file_and_value(small: Path) -> None:
    label_path = small / "labelsTr" / "patient001_frame01.nii.gz"
    label = nib.load(label_path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 1] = 7
    nib.save(nib.Nifti1Image(data, label.affine, label.header), label_path)
    with pytest.raises(ValueError, match=re.escape(f"{label_path}: label value 7 not in dataset.json's labels")):
        load_case(open_acdc(small), "patient001_frame01")


def test_label_shape_differing_from_the_image_names_the_file_and_both_shapes(small: Path) -> None:
    label_path = small / "labelsTr" / "patient001_frame01.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :2], label.affine), label_path)
    with pytest.raises(ValueError, match=re.escape(f"{label_path}: label shape (24, 20, 2) differs from the "
                                                   "image's (24, 20, 3)")):
        load_case(open_acdc(small), "patient001_frame01")


def test_label_voxel_size_differing_from_the_image_names_the_file(small: Path) -> None:
    label_path = small / "labelsTr" / "patient001_frame01.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([1.0, 1.0, 10.0, 1.0])), label_path)
    with pytest.raises(ValueError, match=re.escape(f"{label_path}: voxel size (1.0, 1.0, 10.0) differs")):
        load_case(open_acdc(small), "patient001_frame01")


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_unreadable_nifti_names_the_file(small: Path, damage: str) -> None:
    image_path = small / "imagesTr" / "patient001_frame01_0000.nii.gz"
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a NIfTI file")
    with pytest.raises(ValueError, match=re.escape(f"{image_path}: unreadable NIfTI")):
        load_case(open_acdc(small), "patient001_frame01")


def test_unknown_case_and_bad_arguments_name_the_field(tiny: AcdcDataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="case: unknown case 'patient999_frame01'"):
        load_case(tiny, "patient999_frame01")
    with pytest.raises(ValueError, match="size: expected an integer >= 1"):
        load_slices(tiny, tiny.training, size=0)
    with pytest.raises(ValueError, match=r"shape: expected \(H, W, slices\)"):
        write_tiny_acdc(tmp_path, shape=(24, 20))
