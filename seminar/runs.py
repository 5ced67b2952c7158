"""Runs: names, where their checkpoints live, and the in-process driver.

`run_in_process` trains every student in this process through `InProcessExchange`; the
Ray driver (`cluster.trainer.run_training`) runs the same `train_worker` on a cluster.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import checkpoint, storage
from .config import SpecError, TrainConfig
from .engine import WorkerContext, train_worker
from .exchange import InProcessExchange
from .history import RunLog, new_run_name, read_history
from .metrics import ENSEMBLE_MIOU, LOSS_TERMS, PSEUDO_LABEL_METRICS, SERVED_IOU, SERVED_MIOU, student_key, val_miou_key
from .progress import Progress

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
    device = in_process_device(cfg.resources.device)  # before any work
    cfg = with_run_name(cfg)
    storage.check_writable(cfg.storage.path, cfg.storage.run_name)
    resume = checkpoint.latest_in_run(_run_dir(cfg))
    resume_local = str(checkpoint.local_copy(resume)) if resume else None
    if resume:
        console.print(f"resuming run [bold]{cfg.storage.run_name}[/] from {resume}")
    else:
        console.print(f"run [bold]{cfg.storage.run_name}[/]: {cfg.num_students} students in one process")

    start = checkpoint.read_meta(resume)["step"] if resume else 0
    progress = Progress(cfg, start, console)
    saved: list[str] = []

    log = RunLog(_run_dir(cfg), cfg.storage.tensorboard)

    def report(metrics: dict[str, float], directory: str | None) -> None:
        log.append(metrics)  # every report: the run's curves
        progress.update(metrics)
        if directory:
            uri = f"{_run_dir(cfg)}/checkpoints/step_{int(metrics['step']):07d}"
            if storage.is_s3(uri):
                storage.upload_dir(directory, uri)
            else:
                shutil.copytree(directory, uri, dirs_exist_ok=True)
            saved.append(uri)

    ctx = WorkerContext(students=list(range(cfg.num_students)), device=device,
                        precision=cfg.resources.precision, channels_last=cfg.resources.channels_last)
    try:
        metrics = train_worker(cfg, ctx, InProcessExchange(cfg.num_students), report, resume_from=resume_local)
    finally:
        progress.close()
    final = saved[-1] if saved else resume
    return RunResult(cfg.storage.run_name, final, metrics or checkpoint.read_meta(final)["metrics"])


def in_process_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("resources.device=cuda, but torch sees no CUDA device here (a CPU build of torch, "
                        "or no GPU): use resources.device=auto or cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def summary_table(metrics: dict[str, float], classes: list[str], num_students: int) -> Table:
    """Per-class IoU of the served model, then every student's and teacher's mIoU."""
    table = Table(title="validation")
    table.add_column("")
    table.add_column("IoU / mIoU", justify="right")
    for i, name in enumerate(classes):
        value = metrics.get(f"{SERVED_IOU}{i}")
        if value is not None:
            table.add_row(f"  {name}", "-" if value != value else f"{value:.3f}")
    for k in range(num_students):
        role = "primary" if k == 0 else "ancillary"
        for who in ("student", "teacher"):
            value = metrics.get(val_miou_key(k, who))
            if value is not None:
                table.add_row(f"student {k} ({role}) {who}", f"{value:.3f}")
    if ENSEMBLE_MIOU in metrics:
        table.add_row("teachers' ensemble", f"{metrics[ENSEMBLE_MIOU]:.3f}")
    if SERVED_MIOU in metrics:
        table.add_row("[bold]served model mIoU[/]", f"[bold]{metrics[SERVED_MIOU]:.3f}[/]")
    return table


@dataclass
class RunInfo:
    """What a run directory holds: its latest checkpoint and history, read back."""

    name: str
    directory: str
    checkpoint: str | None  # the latest complete one
    meta: dict  # that checkpoint's meta.json ({} without one)
    history: list[dict[str, float]]

    @property
    def step(self) -> int:
        return max([int(self.meta.get("step", 0))] + [int(h.get("step", 0)) for h in self.history[-1:]])

    @property
    def steps(self) -> int | None:
        return (self.meta.get("spec") or {}).get("optim", {}).get("steps")

    @property
    def final_evaluation(self) -> dict[str, float] | None:
        """The metrics of the evaluation at the run's last step; None while it is unfinished."""
        return next((h for h in self.history if h.get("step") == self.steps and SERVED_MIOU in h), None)

    @property
    def served_miou(self) -> float | None:
        evaluated = [h for h in self.history if SERVED_MIOU in h]
        if evaluated:
            return evaluated[-1][SERVED_MIOU]
        return (self.meta.get("metrics") or {}).get(SERVED_MIOU)


def read_run(directory: str) -> RunInfo:
    directory = directory.rstrip("/")
    latest = checkpoint.latest_in_run(directory)
    meta = checkpoint.read_meta(latest) if latest else {}
    return RunInfo(directory.rsplit("/", 1)[-1], directory, latest, meta, read_history(directory))


def list_runs(path: str) -> list[RunInfo]:
    """Every run under a storage path (local or s3://): directories with a history or a checkpoint."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    runs = []
    for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            run = read_run(f"{path.rstrip('/')}/{info.base_name}")
            if run.checkpoint or run.history:
                runs.append(run)
    return sorted(runs, key=lambda r: r.name)


def plot_history(run: RunInfo, out: str | Path) -> Path:
    """Curves of a run: each student's losses, every network's val mIoU, pseudo-label coverage
    and the diagnostics' accuracies, one panel each, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = run.history
    num_students = run.meta.get("num_students") or len({k.split("/")[0] for h in history for k in h
                                                         if re.fullmatch(r"s\d+/loss", k)})
    panels = [
        ("losses", [student_key(k, t) for k in range(num_students) for t in LOSS_TERMS]),
        ("val mIoU", [val_miou_key(k, w) for k in range(num_students) for w in ("student", "teacher")]
         + [ENSEMBLE_MIOU, SERVED_MIOU]),
        ("pseudo-labels (unclicked pixels)", [student_key(k, m) for k in range(num_students)
                                              for m in PSEUDO_LABEL_METRICS]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 10 else None, markersize=3,
                        label="served" if key == SERVED_MIOU else key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"run {run.name}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
