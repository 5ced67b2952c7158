"""The Ray-free commands of `seminar` (`evaluate`, `runs`, `data`) and what every command
shares: `fail`, the spec from `--config`/`--set`, the training summary.

The `seminar` app itself is assembled at the top of the house, in `jobs/main.py`: this
package imports nothing from `cluster`, `jobs` or `serving`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import SpecError, TrainConfig, checkpoint_spec

if TYPE_CHECKING:
    from .data.inspect import ClickReport

# In a terminal, its width; in logs and pipes (a submitted sweep's table), wide enough.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)  # one line stays one line


def fail(message: str, code: int = 2) -> None:
    """One `error:` line on stderr, then exit (2: bad input, before any work)."""
    errors.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def spec_from_options(config: Optional[Path], overrides: list[str]) -> TrainConfig:
    """The spec from --config and --set, validated in full (schema, models, paths, classes,
    sweep) before any work; exit 2 naming every bad field."""
    from .checks import load_checked_spec

    try:
        return load_checked_spec(config, overrides)
    except SpecError as e:
        fail(str(e))


def print_training_summary(cfg: TrainConfig, result) -> None:
    """The end of `seminar train`: per-class table, served mIoU and why, click purity, checkpoint."""
    from .checkpoint import read_meta
    from .metrics import SERVED_MIOU
    from .runs import summary_table

    meta = read_meta(result.checkpoint)
    console.print(summary_table(result.metrics, meta["classes"], cfg.num_students))
    why = {"best_teacher": "the best val mIoU among the teachers and their ensemble"}.get(
        cfg.method.inference, f"method.inference={cfg.method.inference}")
    console.print(f"mIoU {result.metrics.get(SERVED_MIOU, float('nan')):.4f} (served model: {meta.get('served')}, "
                  f"{why}; {cfg.data.dataset} {cfg.data.val_split}, clicks: {meta['click_source']})")
    if "data/click_purity" in result.metrics:
        console.print(f"click purity {result.metrics['data/click_purity']:.1%} of click-disk pixels on their own "
                      f"class (training images with masks)")
    console.print(f"checkpoint: {result.checkpoint}", soft_wrap=True)


def evaluate(
    checkpoint: str = typer.Argument(..., help="checkpoint or run directory (its latest checkpoint), local or s3://"),
    data: Optional[Path] = typer.Option(None, "--data", help="a spec whose data section to evaluate on; default: the checkpoint's"),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="override a data field: data.key=value"),
    split: Optional[str] = typer.Option(None, "--split", help="default: the spec's val split"),
    which: Optional[str] = typer.Option(None, "--which", help="best_teacher | primary_teacher | primary_student | teacher_ensemble"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG of image | clicks | prediction | ground truth"),
    samples: int = typer.Option(4, "--samples", help="rows in the grid"),
) -> None:
    """Per-class IoU and mIoU of a checkpoint on a dataset."""
    from .data import ClickFileError, DatasetError
    from .evaluate import evaluate_checkpoint, save_grid
    from .predict import Segmenter
    from .storage import NotWritable, check_output

    try:
        if grid:
            check_output(grid, "--grid")
    except NotWritable as e:
        fail(str(e))
    try:
        segmenter = Segmenter.load(checkpoint, which=which)
    except (OSError, ValueError) as e:  # missing or broken files; storage that does not answer
        fail(f"cannot load {checkpoint}: {' '.join(str(e).split())}")
    if data is not None:
        cfg = spec_from_options(data, overrides)
    else:
        base = checkpoint_spec(segmenter.meta["spec"]).model_dump(mode="json")
        from .config import apply_overrides

        try:
            cfg = TrainConfig.model_validate(apply_overrides(base, overrides))
        except Exception as e:  # noqa: BLE001 - pydantic names the field
            fail(str(e))
    split = split or cfg.data.val_split
    try:
        result = evaluate_checkpoint(segmenter, cfg.data, split)
    except (ClickFileError, DatasetError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    table = Table(title=f"{segmenter.version} ({segmenter.which}) on {cfg.data.dataset} {split}, "
                        f"{result.images} images")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in zip(result.classes, result.matrix.iou().tolist()):
        table.add_row(name, "-" if iou != iou else f"{iou:.3f}")
    table.add_row("[bold]mIoU[/]", f"[bold]{result.matrix.miou():.4f}[/]")
    console.print(table)
    console.print(f"pixel accuracy {result.matrix.pixel_accuracy():.4f}; training clicks: {segmenter.meta['click_source']}")
    if grid:
        console.print(f"grid: {save_grid(segmenter, cfg.data, split, grid, samples)}", soft_wrap=True)


runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Runs under a storage path: list, show, plot.")
PATH_HELP = "storage path the runs are under (a spec's storage.path): local or s3://"


def _run_directory(run: str, path: str) -> str:
    """RUN as given when it is a directory (or s3:// URI), else PATH/RUN."""
    return run if run.startswith("s3://") or Path(run).is_dir() else f"{path.rstrip('/')}/{run}"


@runs_app.command("list")
def runs_list(path: str = typer.Option("runs", "--path", help=PATH_HELP)) -> None:
    """Every run: its step, the served model's val mIoU, its latest checkpoint."""
    from .runs import list_runs

    try:
        runs = list_runs(path)
    except (OSError, ValueError) as e:
        fail(f"cannot list runs under {path}: {' '.join(str(e).split())}")
    table = Table(title=f"runs under {path}")
    table.add_column("run", no_wrap=True)  # a name to copy: never folded
    for column in ("step", "served mIoU", "latest checkpoint"):
        table.add_column(column, overflow="fold")
    for r in runs:
        miou = "-" if r.served_miou is None else f"{r.served_miou:.4f}"
        table.add_row(r.name, f"{r.step}/{r.steps or '?'}", miou, r.checkpoint or "-")
    console.print(table)
    if not runs:
        console.print(f"no runs under {path}")


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="run name under --path, or a run directory"),
              path: str = typer.Option("runs", "--path", help=PATH_HELP)) -> None:
    """A run's spec, status, last metrics and checkpoints."""
    from .checkpoint import META
    from .history import HISTORY
    from .runs import read_run

    info = read_run(_run_directory(run, path))
    if not info.checkpoint and not info.history:
        fail(f"{info.directory}: no run there (no checkpoint with {META}, no {HISTORY})")
    spec = info.meta.get("spec") or {}
    status = "finished" if info.steps and info.step >= info.steps else f"stopped or running at step {info.step}"
    console.print(f"[bold]{info.name}[/]  {info.directory}")
    console.print(f"  status:      {status} (of {info.steps or '?'} steps)")
    if spec:
        students = ", ".join(s["model"] for s in spec["students"])
        m = spec["method"]
        console.print(f"  data:        {spec['data']['dataset']} ({spec['data'].get('root') or 'built-in'}), "
                      f"clicks: {info.meta.get('click_source')}")
        console.print(f"  students:    {students}")
        console.print(f"  method:      w_ts={m['w_ts']} w_ss={m['w_ss']} tau={m['tau']} ema_decay={m['ema_decay']} "
                      f"supervision={m['supervision']}")
    last = info.history[-1] if info.history else info.meta.get("metrics", {})
    table = Table(title=f"last report (step {last.get('step', '?')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in last if "/iou/" not in k and "click_purity/" not in k):
        value = last[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"  latest checkpoint: {info.checkpoint or '-'}  (served: {info.meta.get('served', '-')})")


@runs_app.command("plot")
def runs_plot(run: str = typer.Argument(..., help="run name under --path, or a run directory"),
              out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="PNG to write"),
              path: str = typer.Option("runs", "--path", help=PATH_HELP)) -> None:
    """PNG curves: each student's losses, every network's val mIoU, pseudo-label coverage and accuracy."""
    from .runs import plot_history, read_run
    from .storage import NotWritable, check_output

    try:
        check_output(out, "--out")
    except NotWritable as e:
        fail(str(e))
    info = read_run(_run_directory(run, path))
    if not info.history:
        fail(f"{info.directory}: no metrics.jsonl to plot")
    console.print(f"curves: {plot_history(info, out)}", soft_wrap=True)


# --------------------------------------------------------------------------------------
# seminar data: look at click data before training on it
# --------------------------------------------------------------------------------------

data_app = typer.Typer(help="Inspect click data.", no_args_is_help=True, rich_markup_mode=None)


@data_app.callback()
def _data() -> None:
    """Click tables and What's the Point files."""


def print_report(report: "ClickReport") -> None:
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
    from .data.clicks import ClickFileError
    from .data.inspect import inspect_clicks

    try:
        report = inspect_clicks(clicks, masks_dir=masks, images_dir=images, radius=radius)
    except ClickFileError as e:
        fail(str(e))
    print_report(report)


def register(app: typer.Typer) -> None:
    """Add evaluate, runs and data to the `seminar` app."""
    app.command("evaluate")(evaluate)
    app.add_typer(runs_app, name="runs")
    app.add_typer(data_app, name="data", help="Inspect click data and datasets.")
