"""Runs: names, where their checkpoints live, and the in-process driver.

`run_in_process` trains every student in this process through `InProcessExchange`; the
Ray driver (`cluster.trainer.run_training`) runs the same `train_worker` on a cluster.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from . import checkpoint, storage
from .config import TrainConfig
from .engine import WorkerContext, train_worker
from .exchange import InProcessExchange

# Every report of an in-process run, one JSON object a line, beside its checkpoints.
HISTORY = "metrics.jsonl"


def new_run_name() -> str:
    return f"seminar-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def with_run_name(cfg: TrainConfig) -> TrainConfig:
    """A copy of the spec with a run name: the given one (resume) or a new unique one."""
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_name": cfg.storage.run_name or new_run_name()})})


@dataclass
class RunResult:
    run_name: str
    checkpoint: str  # local path or s3:// URI of the final checkpoint
    metrics: dict[str, float]


def _run_dir(cfg: TrainConfig) -> str:
    return f"{cfg.storage.path.rstrip('/')}/{cfg.storage.run_name}"


def run_in_process(cfg: TrainConfig, console: Console | None = None) -> RunResult:
    console = console or Console()
    cfg = with_run_name(cfg)
    storage.check_writable(cfg.storage.path, cfg.storage.run_name)
    resume = checkpoint.latest_in_run(_run_dir(cfg))
    resume_local = str(checkpoint.local_copy(resume)) if resume else None
    if resume:
        console.print(f"resuming run [bold]{cfg.storage.run_name}[/] from {resume}")
    else:
        console.print(f"run [bold]{cfg.storage.run_name}[/]: {cfg.num_students} students in one process")

    start = checkpoint.read_meta(resume)["step"] if resume else 0
    bar = tqdm(total=cfg.optim.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    saved: list[str] = []

    history = None if storage.is_s3(cfg.storage.path) else Path(cfg.storage.path) / cfg.storage.run_name / HISTORY
    if history:
        history.parent.mkdir(parents=True, exist_ok=True)

    def report(metrics: dict[str, float], directory: str | None) -> None:
        if history:  # every report, one JSON line: the run's curves
            with history.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.update(int(metrics["step"]) - bar.n)
        bar.set_postfix({f"s{k}": f"{metrics.get(f's{k}/loss', float('nan')):.3f}" for k in range(cfg.num_students)})
        if directory:
            uri = f"{_run_dir(cfg)}/checkpoints/step_{int(metrics['step']):07d}"
            if storage.is_s3(uri):
                storage.upload_dir(directory, uri)
            else:
                shutil.copytree(directory, uri, dirs_exist_ok=True)
            saved.append(uri)

    ctx = WorkerContext(students=list(range(cfg.num_students)))
    metrics = train_worker(cfg, ctx, InProcessExchange(cfg.num_students), report, resume_from=resume_local)
    bar.close()
    final = saved[-1] if saved else resume
    return RunResult(cfg.storage.run_name, final, metrics or checkpoint.read_meta(final)["metrics"])


def summary_table(metrics: dict[str, float], classes: list[str], num_students: int) -> Table:
    """Per-class IoU of the served model, then every student's and teacher's mIoU."""
    table = Table(title="validation")
    table.add_column("")
    table.add_column("IoU / mIoU", justify="right")
    for i, name in enumerate(classes):
        value = metrics.get(f"val/iou/{i}")
        if value is not None:
            table.add_row(f"  {name}", "-" if value != value else f"{value:.3f}")
    for k in range(num_students):
        role = "primary" if k == 0 else "ancillary"
        for who in ("student", "teacher"):
            value = metrics.get(f"s{k}/val_miou_{who}")
            if value is not None:
                table.add_row(f"student {k} ({role}) {who}", f"{value:.3f}")
    if "val_miou_teacher_ensemble" in metrics:
        table.add_row("teachers' ensemble", f"{metrics['val_miou_teacher_ensemble']:.3f}")
    if "val/miou" in metrics:
        table.add_row("[bold]served model mIoU[/]", f"[bold]{metrics['val/miou']:.3f}[/]")
    return table
