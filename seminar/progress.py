"""Live progress of a training run, the same on every path (in-process, on Ray, in a job's logs).

On a terminal: a bar with the step, ETA, images/s, and each student's loss terms and
pseudo-label coverage. Elsewhere (a file, a submitted job's logs): the same as one plain
line per report. Every evaluation is printed as a line when it happens.

The in-process driver feeds it each report; the Ray driver follows the run's
`metrics.jsonl` (written by rank 0) with `follow_history`, so it needs nothing from the
workers but what they already store.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from tqdm import tqdm

from .config import TrainConfig
from .history import read_history
from .metrics import ENSEMBLE_MIOU, LOSS_TERMS, SERVED_MIOU, student_key, val_miou_key


class Progress:
    def __init__(self, cfg: TrainConfig, start: int, console: Console):
        self.total, self.start = cfg.optim.steps, start
        self.num_students, self.batch_size = cfg.num_students, cfg.optim.batch_size
        self.console = console
        self.last_step = start
        self.t0 = time.monotonic()
        self.bar = (tqdm(total=self.total, initial=start, desc="train", unit="step", dynamic_ncols=True)
                    if console.is_terminal else None)

    def update(self, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if step <= self.last_step:
            return  # a step reported again after a resume
        self.last_step = step
        terms = self.terms(metrics)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(terms, refresh=True)
        else:
            self.write(f"step {step}/{self.total} ({step / self.total:.0%}, eta {self.eta(step)}) {terms}")
        if any("val_miou" in key or key == SERVED_MIOU for key in metrics):
            self.write(f"step {step}: {self.evaluation(metrics)}")

    def terms(self, m: dict[str, float]) -> str:
        parts = []
        step_time = m.get("s0/step_time")
        if step_time:
            parts.append(f"{self.batch_size / step_time:.1f} img/s")
        for k in range(self.num_students):
            terms = [f"{t.removeprefix('loss_')} {m[student_key(k, t)]:.3f}" for t in LOSS_TERMS
                     if student_key(k, t) in m]
            if student_key(k, "pseudo_frac") in m:
                terms.append(f"coverage {m[student_key(k, 'pseudo_frac')]:.0%}")
            if terms:
                parts.append(f"s{k} " + " ".join(terms))
        return " | ".join(parts)

    def evaluation(self, m: dict[str, float]) -> str:
        """'val mIoU: served 0.41; s0 student 0.38 teacher 0.40; ...; ensemble 0.41'."""
        parts = [f"served {m[SERVED_MIOU]:.3f}"] if SERVED_MIOU in m else []
        for k in range(self.num_students):
            scores = [f"{who} {m[val_miou_key(k, who)]:.3f}" for who in ("student", "teacher")
                      if val_miou_key(k, who) in m]
            if scores:
                parts.append(f"s{k} " + " ".join(scores))
        if ENSEMBLE_MIOU in m:
            parts.append(f"teachers' ensemble {m[ENSEMBLE_MIOU]:.3f}")
        return "val mIoU: " + "; ".join(parts)

    def eta(self, step: int) -> str:
        done, elapsed = step - self.start, time.monotonic() - self.t0
        if done <= 0 or elapsed <= 0:
            return "?"
        seconds = math.ceil((self.total - step) * elapsed / done)
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def follow_history(run_dir: str, progress: Progress, poll_s: float = 2.0) -> Iterator[None]:
    """Feed `progress` the reports appended to a run's `metrics.jsonl` while the block runs
    (a Ray run: rank 0 writes it), and the last ones when it ends."""
    stop = threading.Event()

    def poll() -> None:
        try:
            for report in read_history(run_dir):
                progress.update(report)
        except (OSError, ValueError):
            pass  # storage unreachable for a moment, or a line half written: the next poll reads it

    def loop() -> None:
        while not stop.wait(poll_s):
            poll()

    thread = threading.Thread(target=loop, name="seminar-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
        progress.close()
