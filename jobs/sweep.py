"""Hyperparameter sweeps: Ray Tune over any spec fields, each trial a full training run.

The spec's `sweep` section names the fields and their distributions (dotted names, e.g.
`method.ema_decay: {grid: [0.99, 0.999]}`). Every trial is a Tune *function trainable*
that builds the run's `TorchTrainer` (K×R workers, `cluster.trainer.build_trainer`) and
fits it; a Ray Train callback forwards each evaluation to Tune. (`Tuner(trainer)` no
longer works with Ray Train V2: a function trainable driving the trainer is the pattern.)

ASHA stops the trials that trail at its rungs. Its unit of time is one *evaluation*:
only reports that carry the sweep's metric (`val/miou` by default, every
`schedule.eval_every` steps and at the end) reach Tune, with the latest training
metrics of every student merged in. `sweep.grace_period` evaluations pass before a
trial can be stopped.

At the end: a table of the trials, a plot of validation mIoU per trial (PNG next to the
results), and the best trial's checkpoint published to the model registry.

    <storage.path>/<sweep name>/                 Tune's experiment (one folder per trial)
    <storage.path>/<sweep name>/runs/trial-<id>/  each trial's Ray Train run, checkpoints
    <storage.path>/<sweep name>/val_miou.png
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from rich.console import Console
from rich.table import Table

from cluster.preflight import check_resources, worker_resources
from cluster.trainer import build_trainer, connect, storage_location
from seminar.history import new_run_name
from seminar.registry import ModelRegistry, default_registry
from seminar.checks import candidate_values
from seminar.config import set_field
from seminar.config import SweepConfig, TrainConfig

TRIAL_RUNS_DIR = "runs"
PLOT_FILE = "val_miou.png"
TRIAL_DRIVER_CPUS = 0.25


# --------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: dotted field name -> Tune domain."""
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {name: make[kind](values) for name, dist in sweep.params.items() for kind, values in dist.items()}


def evaluations_per_run(cfg: TrainConfig) -> int:
    """How many evaluations a full trial reports: ASHA's max_t."""
    steps = [cfg.optim.steps]
    for name, dist in cfg.sweep.params.items() if cfg.sweep else []:
        if name == "optim.steps":
            steps += [int(v) for v in candidate_values(dist)]
    return math.ceil(max(steps) / cfg.schedule.eval_every)


# --------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------


class EvaluationReportCallback(TuneReportCallback):
    """Ray's TuneReportCallback, forwarding evaluations with every worker's metrics.

    Ray's callback forwards rank 0's metrics of every report. `cluster.trainer` already
    gathers every student's metrics on rank 0; merging the other ranks here as well keeps
    that true for any worker layout. Reports without the metric (training logs between
    evaluations) are folded into the next evaluation instead of reaching Tune, so every
    Tune result carries the metric that ASHA compares.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric
        self.latest: dict[str, Any] = {}

    def after_report(self, run_context, metrics, checkpoint):
        for rank_metrics in reversed(metrics):  # rank 0 last: its values win
            self.latest.update(rank_metrics)
        if checkpoint:
            self.latest[CHECKPOINT_PATH_KEY] = checkpoint.path
        if any(self.metric in m for m in metrics):
            super().after_report(run_context, [dict(self.latest)], None)  # the path is in `latest`


def train_trial(config: dict[str, Any], base_spec: dict, runs_path: str) -> None:
    """A Tune function trainable: the base spec with this trial's values, trained on Ray."""
    raw = copy.deepcopy(base_spec)
    for name, value in config.items():
        set_field(raw, name, value)
    raw["sweep"] = None
    raw["storage"]["path"] = runs_path
    cfg = TrainConfig.model_validate(raw)
    run_name = f"trial-{tune.get_context().get_trial_id()}"
    trainer = build_trainer(cfg, run_name, callbacks=[EvaluationReportCallback(base_spec["sweep"]["metric"])])
    trainer.fit()


# --------------------------------------------------------------------------------------
# Watching the sweep
# --------------------------------------------------------------------------------------

PENDING_REPORT_S = 60.0  # a placement group waiting this long is reported, with what is free


class SweepWatch(tune.Callback):
    """What the sweep is doing, printed as it happens (Tune's own output is off): a table of
    the trials at each evaluation, and resources that trials have waited for over
    PENDING_REPORT_S (their workers' placement groups) against what the cluster has free."""

    def __init__(self, console: Console, metric: str, mode: str, params: list[str], max_t: int):
        self.console, self.metric, self.mode, self.params, self.max_t = console, metric, mode, params, max_t
        self.pending_since: dict[str, float] = {}  # placement group id -> first seen pending
        self.reported: set[str] = set()
        self.next_check = 0.0

    def __getstate__(self) -> dict:
        # Tune saves its run config, callbacks included, for a restore: not the console.
        return {**self.__dict__, "console": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, console=state["console"] or Console())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.console.print(self.headline(trials, trial, result), soft_wrap=True)
        self.console.print(self.table(trials))

    def headline(self, trials, trial, result) -> str:
        counts = {}
        for t in trials:
            counts[self.status(t)] = counts.get(self.status(t), 0) + 1
        sign = 1 if self.mode == "max" else -1
        scored = [t for t in trials if isinstance(t.last_result.get(self.metric), float)]
        best = max(scored, key=lambda t: sign * t.last_result[self.metric], default=None)
        return (f"trial {trial.trial_id}, evaluation {result.get('training_iteration')}/{self.max_t} "
                f"(step {result.get('step')}): {self.metric} {result.get(self.metric, float('nan')):.4f}; "
                + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                + (f"; best {best.last_result[self.metric]:.4f} ({best.trial_id})" if best else ""))

    def table(self, trials) -> Table:
        table = Table()
        table.add_column("trial", no_wrap=True)
        for p in self.params:
            table.add_column(p.rsplit(".", 1)[-1], justify="right")
        table.add_column("status")
        table.add_column("evals", justify="right")
        table.add_column(self.metric, justify="right")
        for t in trials:
            value = t.last_result.get(self.metric)
            table.add_row(t.trial_id, *[_fmt(t.config.get(p)) for p in self.params], self.status(t),
                          f"{t.last_result.get('training_iteration', 0)}/{self.max_t}",
                          "-" if value is None else f"{value:.4f}")
        return table

    def status(self, trial) -> str:
        if trial.status == "TERMINATED":
            return "done" if trial.last_result.get("training_iteration", 0) >= self.max_t else "stopped"
        return trial.status.lower()

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + 5
        try:
            from ray.util.state import list_placement_groups

            pending = list_placement_groups(filters=[("state", "=", "PENDING")], detail=True, timeout=5)
        except Exception:  # the state API is the dashboard's: a message is not worth failing a sweep for
            return
        for group in pending:
            gid = group.placement_group_id
            waited = now - self.pending_since.setdefault(gid, now)
            if waited >= PENDING_REPORT_S and gid not in self.reported:
                self.reported.add(gid)
                self.console.print(f"waiting {waited:.0f} s for resources: {demand_text(group.bundles or [])} "
                                   f"(running trials: {sum(t.status == 'RUNNING' for t in trials)}); "
                                   f"free now: {free_text()}", soft_wrap=True)


def demand_text(bundles: list[dict]) -> str:
    """'2 x {CPU: 3}' for a placement group's bundles."""
    counted: dict[str, int] = {}
    for bundle in bundles:
        shape = ", ".join(f"{k}: {v:g}" for k, v in sorted((bundle.get("unit_resources") or {}).items())
                          if not k.startswith(("bundle_group", "node:")))
        counted[shape] = counted.get(shape, 0) + 1
    return " + ".join(f"{n} x {{{shape}}}" for shape, n in counted.items()) or "a placement group"


def free_text() -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{k} {free.get(k, 0):g} of {total[k]:g}" for k in ("CPU", "GPU") if total.get(k))


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # TERMINATED, ERROR, ...
    evaluations: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(repr=False)  # one dict per evaluation
    error: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def value(self, metric: str) -> float | None:
        v = self.last.get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    @property
    def checkpoint(self) -> str | None:
        for row in reversed(self.history):
            if row.get("checkpoint_path"):
                return row["checkpoint_path"]
        return None


@dataclass
class SweepResult:
    name: str
    path: str  # <storage.path>/<name>
    metric: str
    mode: str
    max_evaluations: int
    trials: list[TrialSummary]
    best: TrialSummary | None
    plot: str | None = None
    published: Any = None  # seminar.registry.ModelVersion
    wall_s: float = 0.0

    @property
    def stopped_early(self) -> list[TrialSummary]:
        return [t for t in self.trials if t.stopped_early]


def run_sweep(cfg: TrainConfig, address: str | None = None, registry: str | None = None,
              name: str | None = None, publish: bool = True, console=None) -> SweepResult:
    """Run the spec's sweep on Ray (`address`, RAY_ADDRESS, or an embedded local Ray)."""
    console = console or Console(width=None if sys.stdout.isatty() else 160)  # logs: no terminal, wide
    sweep = cfg.sweep or SweepConfig()
    if not sweep.params:
        raise ValueError("the spec has no sweep.params: nothing to tune")
    name = name or sweep.name or new_run_name("tune")
    base_path = cfg.storage.path.rstrip("/")
    if "://" not in base_path:
        base_path = str(Path(base_path).expanduser().resolve())
    sweep_path = f"{base_path}/{name}"
    max_t = evaluations_per_run(cfg)

    started_here = connect(address, cfg)
    try:
        # One trial's workers must fit the idle cluster, or the sweep would wait forever.
        capacity = check_resources(cfg, worker_resources(cfg))
        at_once = min(capacity // cfg.num_workers, sweep.max_concurrent or math.inf, _count_trials(sweep))
        storage_path, storage_filesystem = storage_location(base_path)
        trainable = tune.with_parameters(
            train_trial, base_spec=cfg.model_dump(mode="json") | {"sweep": sweep.model_dump(mode="json")},
            runs_path=f"{sweep_path}/{TRIAL_RUNS_DIR}")
        # The trial function only drives its trainer, whose workers reserve their own CPUs
        # and GPUs: a quarter CPU keeps it from taking a whole core (zero is not allowed).
        trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                        grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      verbose=0, callbacks=[SweepWatch(console, sweep.metric, sweep.mode,
                                                                       list(sweep.params), max_t)]),
        )
        per_worker = ", ".join(f"{k}={v:g}" for k, v in worker_resources(cfg).items())
        console.print(f"sweep [bold]{name}[/]: {_count_trials(sweep)} trials of {cfg.num_workers} workers "
                      f"({per_worker} each), {at_once} at once on this cluster; ASHA on {sweep.metric} "
                      f"({sweep.mode}) over {max_t} evaluations; results in {sweep_path}", soft_wrap=True)
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall_s = time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()

    trials = [_summarize_trial(r, list(sweep.params), max_t) for r in grid]
    ranked = [t for t in trials if t.value(sweep.metric) is not None and t.checkpoint]
    sign = 1 if sweep.mode == "max" else -1
    best = max(ranked, key=lambda t: sign * t.value(sweep.metric)) if ranked else None
    result = SweepResult(name, sweep_path, sweep.metric, sweep.mode, max_t, trials, best, wall_s=wall_s)

    console.print(trials_table(result))
    result.plot = save_plot(result)
    console.print(f"plot: {result.plot}")
    if best is None:
        console.print("[red]no trial produced a checkpoint with the metric: nothing to publish[/]")
    elif publish:
        reg = ModelRegistry(registry or sweep.registry or default_registry())
        checkpoint = _checkpoint_uri(best.checkpoint, base_path)
        published = reg.publish(
            checkpoint, sweep.model_name,
            metrics={k: v for k, v in best.last.items()
                     if isinstance(v, (int, float)) and (k.startswith("val/") or k[:1] == "s" and "/" in k)},
            extra={"sweep": {"name": name, "path": sweep_path, "trial_id": best.trial_id, "params": best.params,
                             "metric": sweep.metric, "mode": sweep.mode}})
        result.published = published
        console.print(f"best trial {best.trial_id} ({sweep.metric} {best.value(sweep.metric):.4f}) published as "
                      f"[bold]{published.model}/{published.version}[/] at {published.uri}")
    return result


def _count_trials(sweep: SweepConfig) -> int:
    grid = math.prod(len(v["grid"]) for v in sweep.params.values() if "grid" in v)
    return sweep.num_samples * grid


def _checkpoint_uri(path: str, base_path: str) -> str:
    # With a storage_filesystem Ray reports S3 paths without their scheme.
    return f"s3://{path}" if base_path.startswith("s3://") and not path.startswith("s3://") else path


def _summarize_trial(result, params: list[str], max_t: int) -> TrialSummary:
    df = result.metrics_dataframe
    history = [] if df is None else [
        {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        for row in df.to_dict("records")]
    config = result.config or {}
    error = None if result.error is None else str(result.error).strip().splitlines()[-1][:200]
    evaluations = int(history[-1].get("training_iteration", len(history))) if history else 0
    trial_id = (history[-1].get("trial_id") if history else None) or Path(result.path).name
    return TrialSummary(
        trial_id=str(trial_id), params={p: config.get(p) for p in params},
        status="ERROR" if result.error else "TERMINATED", evaluations=evaluations,
        stopped_early=result.error is None and 0 < evaluations < max_t, history=history, error=error)


def trials_table(result: SweepResult) -> Table:
    """One row per trial, best first: its values, how far it got, every student's mIoU."""
    table = Table(title=f"sweep {result.name}: {len(result.trials)} trials, {len(result.stopped_early)} stopped "
                        f"early by ASHA, {result.wall_s:.0f} s", caption="* published" if result.best else None)
    params = list(result.trials[0].params) if result.trials else []
    students = sorted({k.split("/")[0] for t in result.trials for k in t.last if k.endswith("/val_miou_teacher")})
    table.add_column("trial", no_wrap=True)
    for p in params:
        table.add_column(p.rsplit(".", 1)[-1], justify="right", overflow="fold")
    table.add_column("status")
    table.add_column("evals", justify="right")
    table.add_column("step", justify="right")
    table.add_column(result.metric, justify="right", overflow="fold")
    for s in students:  # every student's metrics reach Tune: each one's teacher mIoU
        table.add_column(f"{s} teacher", justify="right", overflow="fold")

    def rank(t: TrialSummary) -> float:
        v = t.value(result.metric)
        return math.inf if v is None else (-v if result.mode == "max" else v)

    for t in sorted(result.trials, key=rank):
        status = "error" if t.status == "ERROR" else ("stopped" if t.stopped_early else "done")
        value = t.value(result.metric)
        table.add_row(
            t.trial_id + (" *" if result.best is t else ""), *[_fmt(t.params[p]) for p in params], status,
            f"{t.evaluations}/{result.max_evaluations}", _fmt(t.last.get("step")),
            "-" if value is None else f"{value:.4f}", *[_fmt(t.last.get(f"{s}/val_miou_teacher"), 3) for s in students])
    return table


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def save_plot(result: SweepResult) -> str:
    """Validation metric against training step, one line per trial; a PNG next to the results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in result.trials:
        points = [(row["step"], row[result.metric]) for row in t.history if "step" in row and result.metric in row]
        if not points:
            continue
        xs, ys = zip(*points)
        params = ", ".join(f"{p.split('.')[-1]}={_fmt(v)}" for p, v in t.params.items())
        style = "--" if t.stopped_early else "-"
        ax.plot(xs, ys, style, marker="o", label=f"{t.trial_id} ({params})" + (" stopped" if t.stopped_early else ""))
    ax.set_xlabel("training step")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.name}: {result.metric} per trial (dashed: stopped by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    if result.path.startswith("s3://"):
        from seminar import storage

        local = Path(tempfile.mkdtemp(prefix="seminar-sweep-")) / PLOT_FILE
        fig.savefig(local, dpi=120)
        fs, path = storage.filesystem(f"{result.path}/{PLOT_FILE}")
        with fs.open_output_stream(path) as f:
            f.write(local.read_bytes())
        plt.close(fig)
        return f"{result.path}/{PLOT_FILE}"
    out = Path(result.path) / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return str(out)
