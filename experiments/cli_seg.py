"""`samsuite seg ...`: UU-Mamba (U-Mamba + SAM + uncertainty-aware loss) and its ablations on cardiac segmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

seg_app = typer.Typer(no_args_is_help=True, help="Cardiac segmentation: UU-Mamba and its ablations (synthetic or ACDC).")


@seg_app.command("run", context_settings={"allow_extra_args": False})
def run(
    args: Optional[list[str]] = typer.Argument(None, help="[CONFIG.yaml] [key=value ...]"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Train and test each arm for each seed (default: UU-Mamba and U-Net on synthetic slices, one
    seed); results under runs/<name>/. Configs: experiments/configs/seg/*.yaml; any field as key=value."""
    from experiments.cli import split_args
    from seg.train import SegConfig, run_seg
    from shared.config import load_config

    cfg = load_config(SegConfig, *split_args(args))
    run_seg(cfg, progress=progress)
    run_dir = Path(cfg.out_dir) / cfg.name
    typer.echo((run_dir / "results.md").read_text())
    if (run_dir / "pairs.md").exists():
        typer.echo((run_dir / "pairs.md").read_text())
    typer.echo(f"metrics.jsonl, curves.png, overlays/ and summary.json in {run_dir}")
