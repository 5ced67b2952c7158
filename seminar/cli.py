"""The `seminar` command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import SpecError, TrainConfig, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Semantic segmentation from clicks with seminar learning, on Ray.")
console = Console()


def fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(2)


def spec_from_options(config: Optional[Path], overrides: list[str]) -> TrainConfig:
    try:
        return load_spec(config, overrides)
    except SpecError as e:
        fail(str(e))


def _train_on_ray(cfg: TrainConfig, address: str | None):
    from cluster import PreflightError, run_training  # Ray is imported on this path only

    try:
        return run_training(cfg, address=address, console=console)
    except PreflightError as e:
        fail(str(e))


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="job spec (YAML); default: the embedded synthetic job"),
    overrides: list[str] = typer.Option([], "--set", "-s", help="override a spec field: key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: an embedded local Ray"),
    in_process: bool = typer.Option(False, "--in-process", help="all students in this process, without Ray"),
) -> None:
    """Train the students, evaluate them, save a checkpoint."""
    from .data import ClickFileError, DatasetError
    from .runs import run_in_process, summary_table

    cfg = spec_from_options(config, overrides)
    try:
        result = run_in_process(cfg, console) if in_process else _train_on_ray(cfg, address)
    except (ClickFileError, DatasetError, SpecError, FileNotFoundError) as e:
        fail(str(e))
    from .checkpoint import read_meta

    meta = read_meta(result.checkpoint)
    console.print(summary_table(result.metrics, meta["classes"], cfg.num_students))
    why = {"best_teacher": "the best val mIoU among the teachers and their ensemble"}.get(
        cfg.method.inference, f"method.inference={cfg.method.inference}")
    console.print(f"mIoU {result.metrics.get('val/miou', float('nan')):.4f} (served model: {meta.get('served')}, "
                  f"{why}; {cfg.data.dataset} {cfg.data.val_split}, clicks: {meta['click_source']})")
    if "data/click_purity" in result.metrics:
        console.print(f"click purity {result.metrics['data/click_purity']:.1%} of click-disk pixels on their own "
                      f"class (training images with masks)")
    console.print(f"checkpoint: {result.checkpoint}", soft_wrap=True)


@app.command()
def evaluate(
    checkpoint: str = typer.Argument(..., help="checkpoint directory or s3:// URI"),
    data: Optional[Path] = typer.Option(None, "--data", help="a spec whose data section to evaluate on; default: the checkpoint's"),
    overrides: list[str] = typer.Option([], "--set", "-s", help="override a data field: data.key=value"),
    split: Optional[str] = typer.Option(None, "--split", help="default: the spec's val split"),
    which: Optional[str] = typer.Option(None, "--which", help="best_teacher | primary_teacher | primary_student | teacher_ensemble"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG of image | clicks | prediction | ground truth"),
    samples: int = typer.Option(4, "--samples", help="rows in the grid"),
) -> None:
    """Per-class IoU and mIoU of a checkpoint on a dataset."""
    from .checkpoint import read_meta
    from .data import ClickFileError, DatasetError
    from .evaluate import evaluate_checkpoint, save_grid
    from .predict import Segmenter

    try:
        segmenter = Segmenter.load(checkpoint, which=which)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if data is not None:
        cfg = spec_from_options(data, overrides)
    else:
        base = TrainConfig.model_validate(read_meta(checkpoint)["spec"]).model_dump(mode="json")
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


def _register_extensions() -> None:
    import jobs.cli
    import serving.cli

    from .data.cli import data_app

    app.add_typer(data_app, name="data", help="Inspect click files and datasets.")
    jobs.cli.register(app)
    serving.cli.register(app)


_register_extensions()

if __name__ == "__main__":
    app()
