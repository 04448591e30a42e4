"""PNG overlays of segmentations, one row per slice: the image, the ground truth over it, the prediction over it.

Both label panels draw the same way (a translucent fill and its contour per class) so that the eye compares like
with like; the colours are fixed per class (RV, MYO, LV) across every figure, from the Okabe-Ito palette, which
stays distinct under the common colour-vision deficiencies. The prediction's title gives the slice's Dice.
Figures are built with matplotlib's object API on the Agg canvas (no pyplot: no global figure registry, no GUI
backend) and written atomically (`shared.runio.atomic_replace`), so a reader never sees a half-written PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from seg.metrics import dice_reference
from shared.runio import atomic_replace

__all__ = ["CLASS_COLOURS", "PANEL_INCHES", "save_overlays"]

CLASS_COLOURS = {1: ("RV", "#D55E00"), 2: ("MYO", "#009E73"), 3: ("LV", "#56B4E9")}  # ACDC's labels 1..3
PANEL_INCHES = 3.0
LEGEND_INCHES = 0.5  # a strip above the rows for the legend


def _as_maps(name: str, array: np.ndarray, count: int | None) -> np.ndarray:
    """`array` as (n, H, W) (images may be (n, 1, H, W)), with n = `count` when given."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or (count is not None and len(array) != count):
        expected = "(n, H, W)" if count is None else f"({count}, H, W)"
        raise ValueError(f"{name}: expected {expected}, got shape {array.shape}")
    return array


def _labels(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = _as_maps(name, array, shape[0])
    if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer label map of shape {shape}, got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() > max(CLASS_COLOURS)):
        raise ValueError(f"{name}: label values must lie in 0..{max(CLASS_COLOURS)}, got {array.min()}..{array.max()}")
    return array


def _draw_labels(ax: Axes, image: np.ndarray, labels: np.ndarray) -> None:
    """The image in grey with each class filled translucently and outlined in its colour."""
    ax.imshow(image, cmap="gray", interpolation="nearest")
    colours = ["none"] + [colour for _, colour in CLASS_COLOURS.values()]
    masked = np.ma.masked_equal(labels, 0)
    ax.imshow(masked, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, alpha=0.35,
              interpolation="nearest")
    for value, (_, colour) in CLASS_COLOURS.items():
        if (labels == value).any():
            ax.contour(labels == value, levels=[0.5], colors=[colour], linewidths=1.0)


def save_overlays(path: str | Path, images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  dice_per_slice: Sequence[float] | None = None, max_rows: int = 6, dpi: int = 100) -> Path:
    """Write a PNG of up to `max_rows` slices, evenly spaced over the n given (base to apex for a volume's slices):
    images (n, 1, H, W) or (n, H, W), truth and pred int (n, H, W) with labels 0..3. `dice_per_slice` (n values)
    goes in each prediction title; by default it is the slice's mean foreground Dice (NaN-free classes only,
    `seg.metrics.dice_reference`). The figure is 3 panels of PANEL_INCHES wide, one row each, plus a legend strip."""
    images = _as_maps("images", images, None)
    n = len(images)
    truth, pred = _labels("truth", truth, images.shape), _labels("pred", pred, images.shape)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows: expected an integer >= 1, got {max_rows!r}")
    if n == 0:
        raise ValueError("images: expected at least one slice, got none")
    if dice_per_slice is None:
        per_class = dice_reference(pred, truth, len(CLASS_COLOURS) + 1)
        dice_per_slice = [float(np.mean(row[~np.isnan(row)])) if (~np.isnan(row)).any() else np.nan
                          for row in per_class]
    if len(dice_per_slice) != n:
        raise ValueError(f"dice_per_slice: expected {n} values (one per slice), got {len(dice_per_slice)}")

    rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(int))
    fig = Figure(figsize=(3 * PANEL_INCHES, len(rows) * PANEL_INCHES + LEGEND_INCHES), dpi=dpi)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, i in zip(axes, rows):
        row[0].imshow(images[i], cmap="gray", interpolation="nearest")
        row[0].set_title(f"slice {i}", fontsize=9)
        _draw_labels(row[1], images[i], truth[i])
        row[1].set_title("ground truth", fontsize=9)
        _draw_labels(row[2], images[i], pred[i])
        dice = float(dice_per_slice[i])
        row[2].set_title(f"prediction, Dice {dice:.3f}" if np.isfinite(dice) else "prediction, no structure",
                         fontsize=9)
        for ax in row:
            ax.set_axis_off()
    handles = [Patch(facecolor=colour, edgecolor=colour, label=name) for name, colour in CLASS_COLOURS.values()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - LEGEND_INCHES / fig.get_figheight(),
                        wspace=0.05, hspace=0.15)

    path = Path(path)
    atomic_replace(path, lambda temporary: fig.savefig(temporary, format="png", dpi=dpi))
    return path
