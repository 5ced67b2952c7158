"""A run's name and history: every report, one JSON object a line in `<run>/metrics.jsonl`, and with
`storage.tensorboard` the same as TensorBoard scalars in `<run>/tensorboard`."""

from __future__ import annotations

import json
import math
import secrets
import tempfile
import time
from pathlib import Path

from . import storage

# Every report of a run, one JSON object a line, beside its checkpoints (written by one
# process: the in-process driver, or rank 0 on Ray).
HISTORY = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def new_run_name(kind: str | None = None) -> str:
    """A fresh run name: seminar-[KIND-]YYYYmmdd-HHMMSS-<6 hex> (kind: `train`/`tune` for jobs and sweeps)."""
    return f"seminar-{kind + '-' if kind else ''}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def append_history(run_dir: str, metrics: dict[str, float]) -> None:
    """Add one report to `<run_dir>/metrics.jsonl`: appended locally, rewritten on S3 (an
    object cannot be appended to; the file is small)."""
    uri = f"{run_dir.rstrip('/')}/{HISTORY}"
    line = (json.dumps(metrics) + "\n").encode()
    if storage.is_s3(uri):
        storage.write_bytes(uri, (storage.read_bytes(uri) if storage.exists(uri) else b"") + line)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with open(uri, "ab") as f:
            f.write(line)


class RunLog:
    """A run's history, written by one process (the in-process driver, or rank 0 on Ray):
    every report appended to `metrics.jsonl` and, with `storage.tensorboard`, written as
    TensorBoard scalars under `<run>/tensorboard` (made locally, copied after each report
    when the run is on S3)."""

    def __init__(self, run_dir: str, tensorboard: bool = False):
        self.run_dir = run_dir.rstrip("/")
        self.events = self.writer = None
        if tensorboard:
            # tensorboardX (a ray[train] dependency); its synchronous writer, so that each
            # report is in the file when the report returns (SummaryWriter queues to a thread).
            from tensorboardX.event_file_writer import EventsWriter

            self.events = (tempfile.mkdtemp(prefix="seminar-tensorboard-") if storage.is_s3(self.run_dir)
                           else f"{self.run_dir}/{TENSORBOARD}")
            Path(self.events).mkdir(parents=True, exist_ok=True)
            self.writer = EventsWriter(f"{self.events}/events")

    def append(self, metrics: dict[str, float]) -> None:
        append_history(self.run_dir, metrics)
        if self.writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        step, now = int(metrics["step"]), time.time()
        for name, value in metrics.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.write_event(Event(wall_time=now, step=step, summary=scalar(name, value)))
        self.writer.flush()
        if storage.is_s3(self.run_dir):
            storage.upload_dir(self.events, f"{self.run_dir}/{TENSORBOARD}")


def read_history(run_dir: str) -> list[dict[str, float]]:
    """A run's reports in step order; a step reported again after a resume keeps its last report."""
    uri = f"{run_dir.rstrip('/')}/{HISTORY}"
    if not storage.exists(uri):
        return []
    by_step: dict[int, dict] = {}
    for line in storage.read_bytes(uri).decode().splitlines():
        if line.strip():
            report = json.loads(line)
            by_step[int(report.get("step", 0))] = report
    return [by_step[k] for k in sorted(by_step)]
