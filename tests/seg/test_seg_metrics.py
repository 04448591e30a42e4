"""Dice and HD95 (MONAI) against hand-computed values, their empty-structure conventions, and the PNG overlays."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.metrics import dice_per_class, dice_reference, hd95_per_class, one_hot, segmentation_metrics
from seg.overlay import LEGEND_INCHES, PANEL_INCHES, save_overlays
from seg.synthetic import make_slices


def _square(top: int, left: int, side: int = 6, size: int = 16, value: int = 1) -> np.ndarray:
    labels = np.zeros((size, size), dtype=np.int64)
    labels[top:top + side, left:left + side] = value
    return labels


def test_import_does_not_load_monai() -> None:
    code = "import sys, seg.metrics, seg.overlay; assert 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_one_hot_layout() -> None:
    encoded = one_hot(np.array([[[0, 2], [1, 2]]]), 3)
    assert encoded.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(encoded[0, 2].numpy(), [[0, 1], [0, 1]])


def test_dice_matches_the_hand_formula() -> None:
    truth = np.zeros((2, 4, 4), dtype=np.int64)
    pred = np.zeros((2, 4, 4), dtype=np.int64)
    truth[0, 0, :2] = 1  # class 1: |T| = 2
    pred[0, 0, 1:4] = 1  # |P| = 3, |P ∩ T| = 1: Dice 2 / 5
    truth[0, 2:, 2:] = 2  # class 2: |T| = 4
    pred[0, 3, :] = 2  # |P| = 4, |P ∩ T| = 2: Dice 4 / 8
    truth[1] = 3  # class 3 everywhere: |T| = 16
    pred[1, :2] = 3  # |P| = 8, |P ∩ T| = 8: Dice 16 / 24
    hand = np.array([[2 / 5, 4 / 8, math.nan], [math.nan, math.nan, 16 / 24]])
    np.testing.assert_allclose(dice_per_class(pred, truth, 4), hand, rtol=1e-6)
    np.testing.assert_allclose(dice_reference(pred, truth, 4), hand, rtol=1e-12)


def test_monai_dice_equals_the_reference_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    _, truth = make_slices(4, size=32, seed=1)
    pred = np.where(rng.random(truth.shape) < 0.2, rng.integers(0, 4, truth.shape), truth)
    np.testing.assert_allclose(dice_per_class(pred, truth, 4), dice_reference(pred, truth, 4), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_offset_squares_is_the_offset(k: int) -> None:
    truth = _square(4, 4)[None]
    across, down = _square(4, 4 + k)[None], _square(4 + k, 4)[None]
    assert hd95_per_class(across, truth, 2)[0, 0] == pytest.approx(k)
    # pixel sizes (rows, columns): a shift along the columns counts 0.5 per pixel, along the rows 2
    assert hd95_per_class(across, truth, 2, spacing=(2.0, 0.5))[0, 0] == pytest.approx(0.5 * k)
    assert hd95_per_class(down, truth, 2, spacing=(2.0, 0.5))[0, 0] == pytest.approx(2.0 * k)
    per_image = hd95_per_class(np.concatenate([across, across]), np.concatenate([truth, truth]), 2,
                               spacing=[(1.0, 0.5), (1.0, 3.0)])
    np.testing.assert_allclose(per_image[:, 0], [0.5 * k, 3.0 * k])
    assert hd95_per_class(truth, truth, 2, spacing=1.5)[0, 0] == 0


def test_empty_structure_conventions() -> None:
    truth = np.stack([_square(2, 2), _square(2, 2), np.zeros((16, 16), dtype=np.int64)])
    pred = np.stack([_square(2, 5), np.zeros((16, 16), dtype=np.int64), _square(8, 8)])
    # image 0: overlap 6 x 3 of 36 + 36; image 1: missed (truth only); image 2: false positive (prediction only)
    np.testing.assert_allclose(dice_per_class(pred, truth, 3)[:, 0], [36 / 72, 0, 0], rtol=1e-6)
    # class 2 is in neither: no Dice (NaN) unless a convention is asked for
    assert np.isnan(dice_per_class(pred, truth, 3)[:, 1]).all()
    np.testing.assert_array_equal(dice_per_class(pred, truth, 3, empty_dice=1.0)[:, 1], [1, 1, 1])
    np.testing.assert_array_equal(dice_reference(pred, truth, 3, empty_dice=0.0)[:, 1], [0, 0, 0])
    hd95 = hd95_per_class(pred, truth, 3)
    assert hd95[0, 0] == pytest.approx(3) and np.isnan(hd95[1:, 0]).all() and np.isnan(hd95[:, 1]).all()

    metrics = segmentation_metrics(pred, truth, 3, spacing=(1.0, 2.0))
    assert metrics["dice_1"] == pytest.approx(0.5 / 3)  # (0.5 + 0 + 0) / 3
    assert math.isnan(metrics["dice_2"]) and metrics["dice_mean"] == pytest.approx(0.5 / 3)
    assert metrics["hd95_1"] == pytest.approx(6.0) and math.isnan(metrics["hd95_2"])  # 3 columns x 2 mm
    assert metrics["hd95_undefined_1"] == 2 and metrics["hd95_undefined_2"] == 0
    assert metrics["hd95_mean"] == pytest.approx(6.0) and metrics["images"] == 3
    ones = segmentation_metrics(pred, truth, 3, empty_dice=1.0)
    assert ones["dice_2"] == 1.0 and ones["dice_mean"] == pytest.approx((0.5 / 3 + 1) / 2)


def test_metric_input_errors_name_the_argument() -> None:
    truth = _square(2, 2)[None]
    with pytest.raises(ValueError, match=r"pred_labels \(1, 16, 8\) and true_labels \(1, 16, 16\)"):
        segmentation_metrics(truth[:, :, :8], truth, 2)
    with pytest.raises(ValueError, match="pred_labels: expected an integer label map, got torch.float32"):
        dice_per_class(truth.astype(np.float32), truth, 2)
    with pytest.raises(ValueError, match="true_labels: value 3 outside the classes 0..1"):
        dice_reference(truth, truth * 3, 2)
    with pytest.raises(ValueError, match=r"spacing: expected a float, \(2,\) or \(1, 2\) pixel sizes"):
        hd95_per_class(truth, truth, 2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing: expected finite pixel sizes > 0"):
        hd95_per_class(truth, truth, 2, spacing=0.0)
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 2"):
        segmentation_metrics(truth, truth, 1)


def test_overlay_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    images, truth = make_slices(5, size=32, seed=2)
    pred = truth.copy()
    pred[1][pred[1] == 1] = 0
    path = save_overlays(tmp_path / "figures" / "overlay.png", images, truth, pred, max_rows=3)
    assert path == tmp_path / "figures" / "overlay.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (round(3 * PANEL_INCHES * 100), round((3 * PANEL_INCHES + LEGEND_INCHES) * 100))
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]  # no temporary file left behind
    again = save_overlays(path, images[:2, 0], truth[:2], pred[:2], dice_per_slice=[0.9, math.nan])
    with Image.open(again) as png:
        assert png.size[1] == round((2 * PANEL_INCHES + LEGEND_INCHES) * 100)


def test_overlay_errors_name_the_argument(tmp_path: Path) -> None:
    images, truth = make_slices(2, size=32)
    with pytest.raises(ValueError, match="dice_per_slice: expected 2 values"):
        save_overlays(tmp_path / "o.png", images, truth, truth, dice_per_slice=[1.0])
    with pytest.raises(ValueError, match=r"pred: expected \(2, H, W\)"):
        save_overlays(tmp_path / "o.png", images, truth, truth[:1])
    with pytest.raises(ValueError, match="truth: label values must lie in 0..3"):
        save_overlays(tmp_path / "o.png", images, truth + 1, truth)
    assert not list(tmp_path.iterdir())
