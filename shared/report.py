"""Tables (CSV + Markdown) and plots (matplotlib PNG) from result records."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.runio import atomic_write_text


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table with the keys of the first row as columns."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(stem: Path, rows: Sequence[dict[str, Any]], title: str | None = None) -> None:
    """`stem`.csv and `stem`.md, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    atomic_write_text(stem.with_suffix(".md"), (f"**{title}**\n\n" if title else "") + markdown_table(rows))


def learning_curves(path: Path, records: Sequence[dict[str, Any]], title: str) -> None:
    """Test accuracy and training loss against epochs, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name in dict.fromkeys(r["optimizer"] for r in records):
        mine = [r for r in records if r["optimizer"] == name]
        epochs = [r["epoch"] for r in mine]
        acc_ax.plot(epochs, [100 * r["test_acc"] for r in mine], label=name)
        loss_ax.plot(epochs, [r["train_loss"] for r in mine], label=name)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss (eval mode)")
    save_panels(fig, (acc_ax, loss_ax), title, path)


def save_panels(fig: Any, axes: Sequence[Any], title: str, path: Path) -> None:
    """A figure of curve panels: grid and legend on each, the title above, saved at 150 dpi."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path, dpi=150)


def save_figure(fig: Any, path: Path, dpi: int = 130) -> None:
    """Write `fig` as PNG atomically (a temp file, then rename: a killed run never leaves half a plot) and
    close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
