"""Training metrics exported through Ray's metrics system (Prometheus format).

Every worker records the metrics of the students it trains; Ray's per-node metrics agent
serves them on the node's metrics export port (`ray start --metrics-export-port`), with
Ray's `ray_` prefix: e.g. `ray_seminar_train_loss{run="...",student="1",term="ss"}`.
Only replica 0 of each student records, since its replicas report the same all-reduced
values.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from seminar.metrics import LOSSES, student_key

_STEP_SECONDS = [0.01, 0.03, 0.1, 0.3, 1, 2, 5, 10, 30, 100]
_WAIT_SECONDS = [0.0001, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10]
_TERM_LABELS = {name: "total" if name == "loss" else name.removeprefix("loss_") for name in LOSSES}  # loss_ss -> ss


class TrainMetrics:
    """Ray metrics of the students one worker hosts; `record` takes a reported metrics dict."""

    def __init__(self, run_name: str, students: list[int]):
        self.students = students
        self.last_step: dict[int, int] = {k: 0 for k in students}
        tags = ("run", "student")
        self.loss = Gauge("seminar_train_loss", "student loss by term (total, sup, ts, ss, pair)",
                          tag_keys=tags + ("term",))
        self.pseudo_frac = Gauge("seminar_train_pseudo_label_fraction",
                                 "fraction of unclicked valid pixels given a peer pseudo-label", tag_keys=tags)
        # Diagnostics against the training masks where they exist (never trained on).
        self.diag_accuracy = Gauge("seminar_train_diag_accuracy",
                                   "accuracy on unclicked pixels against the training masks (diagnostic only): "
                                   "of the pseudo-label where it covers, of the student", tag_keys=tags + ("of",))
        self.images_per_s = Gauge("seminar_train_images_per_second", "training throughput", tag_keys=tags)
        self.step = Gauge("seminar_train_step", "last reported step", tag_keys=tags)
        self.steps = Counter("seminar_train_steps", "training steps done", tag_keys=tags)
        self.step_time = Histogram("seminar_train_step_seconds", "time of one training step",
                                   boundaries=_STEP_SECONDS, tag_keys=tags)
        self.step_cpu_time = Histogram("seminar_train_step_cpu_seconds",
                                       "CPU seconds the worker process used in one training step",
                                       boundaries=_STEP_SECONDS, tag_keys=tags)
        self.exchange_wait = Histogram("seminar_train_exchange_wait_seconds",
                                       "time a step waited for its peers' predictions",
                                       boundaries=_WAIT_SECONDS, tag_keys=tags)
        self.val_miou = Gauge("seminar_val_miou", "validation mIoU of a student or its teacher",
                              tag_keys=tags + ("model",))
        for metric in (self.loss, self.pseudo_frac, self.diag_accuracy, self.images_per_s, self.step, self.steps,
                       self.step_time, self.step_cpu_time, self.exchange_wait, self.val_miou):
            metric.set_default_tags({"run": run_name})

    def record(self, metrics: dict[str, float]) -> None:
        step = int(metrics.get("step", 0))
        for k in self.students:
            def get(name):
                return metrics.get(student_key(k, name))

            tags = {"student": str(k)}
            for key, term in _TERM_LABELS.items():
                if get(key) is not None:
                    self.loss.set(get(key), tags={**tags, "term": term})
            if get("pseudo_frac") is not None:
                self.pseudo_frac.set(get("pseudo_frac"), tags=tags)
            for of in ("pseudo", "student"):
                if get(f"diag_{of}_acc") is not None:
                    self.diag_accuracy.set(get(f"diag_{of}_acc"), tags={**tags, "of": of})
            if get("images_per_s") is not None:
                self.images_per_s.set(get("images_per_s"), tags=tags)
            if get("step_time") is not None:
                self.step_time.observe(get("step_time"), tags=tags)
            if get("step_cpu_time") is not None:
                self.step_cpu_time.observe(get("step_cpu_time"), tags=tags)
            if get("exchange_wait") is not None:
                self.exchange_wait.observe(get("exchange_wait"), tags=tags)
            for model in ("student", "teacher"):
                if get(f"val_miou_{model}") is not None:
                    self.val_miou.set(get(f"val_miou_{model}"), tags={**tags, "model": model})
            self.step.set(step, tags=tags)
            if step > self.last_step[k]:
                self.steps.inc(step - self.last_step[k], tags=tags)
                self.last_step[k] = step
