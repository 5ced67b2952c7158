"""`seminar data ...`: look at click data before training on it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from seminar.cli import fail
from seminar.data.clicks import ClickFileError
from seminar.data.inspect import ClickReport, inspect_clicks

data_app = typer.Typer(help="Inspect click data.", no_args_is_help=True)


@data_app.callback()
def _data() -> None:
    """Click tables and What's the Point files."""


def print_report(report: ClickReport, console: Console) -> None:
    summary = Table(title=f"{report.path}  (source: {'+'.join(report.sources) or 'none'})", show_header=False)
    summary.add_row("images", f"{report.num_images:,}")
    summary.add_row("clicks", f"{report.num_clicks:,}  ({report.rank1_clicks:,} rank 1)")
    summary.add_row("images with an empty click list", f"{len(report.empty_images):,}")
    summary.add_row("clicks with a negative coordinate", f"{report.negative_clicks:,}")
    summary.add_row("duplicate clicks (same image, class, x, y)", f"{report.duplicate_clicks:,}")
    if report.size_checked_images:
        beyond = f"{report.beyond_image_clicks:,}  (in {report.size_checked_images:,} size-checked images)"
    else:
        beyond = "not checked (give --masks or --images for image sizes)"
    summary.add_row("clicks past the right/bottom edge", beyond)
    summary.add_row("on load: clipped (<= 1 px out) / dropped", f"{report.clipped_on_load:,} / {report.dropped_on_load:,}")
    for image_id, x, y in report.out_of_image_examples:
        summary.add_row("  e.g.", f"{image_id}  x={x:.1f} y={y:.1f}")
    summary.add_row("time", f"{report.seconds:.2f} s")
    console.print(summary)

    per_class = Table(title="clicks per class")
    per_class.add_column("class", justify="right")
    per_class.add_column("name")
    per_class.add_column("clicks", justify="right")
    purity = report.purity.per_class() if report.purity else {}
    if report.purity:
        per_class.add_column(f"purity (r={report.purity.radius})", justify="right")
    for c, count in sorted(report.clicks_per_class.items()):
        name = report.class_names.get(c, "") if report.class_names else ""
        per_class.add_row(str(c), name, f"{count:,}", *([f"{purity[c]:.1%}" if c in purity else "-"] if purity else []))
    console.print(per_class)
    if report.purity:
        console.print(f"click purity {report.purity.overall:.1%} of click-disk pixels (radius {report.purity.radius}) "
                      f"on their own class, in {report.purity.images:,} images with masks")


@data_app.command("inspect")
def inspect_command(
    clicks: str = typer.Argument(..., help="click file: What's the Point .json or Parquet (local or s3://)"),
    masks: Path | None = typer.Option(
        None, "--masks", exists=True, file_okay=False, help="folder of <id>.png masks: gives image sizes"
    ),
    images: Path | None = typer.Option(
        None, "--images", exists=True, file_okay=False, help="folder of <id>.jpg/.png images: gives image sizes"
    ),
    radius: int = typer.Option(3, "--radius", min=0, max=64, help="click disk radius for the purity (data.click_radius)"),
) -> None:
    """Count images, clicks per class, empty lists and clicks outside their image; with
    --masks, click purity per class."""
    console = Console()
    try:
        report = inspect_clicks(clicks, masks_dir=masks, images_dir=images, radius=radius)
    except ClickFileError as e:
        fail(str(e))
    print_report(report, console)
