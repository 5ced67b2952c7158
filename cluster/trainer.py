"""Seminar learning on a Ray cluster with Ray Train (Train V2 API).

Two halves, as in Ray's own examples:

- `train_fn_per_worker(config)` runs on every training worker. With K students and R
  data-parallel replicas per student there are K×R workers; world rank r trains student
  r // R as replica r % R. It sets up the student's gradient subgroup, the exchange with
  its peers and the reporter, and hands over to `seminar.engine.train_worker`, the same
  loop that runs all students in one process.
- `build_trainer(cfg, run_name)` (the driver) builds the `TorchTrainer`; `run_training`
  checks the cluster, storage and resources first, fits, and summarises the result.

    driver ──creates──► ExchangeBoard actor (holds references to teacher predictions)
       │
       └── TorchTrainer(K×R workers) ─► worker r: student r//R, replica r%R
                                          ├─ DDP gradients within the student's replicas
                                          ├─ RayExchange: ray.put / board / ray.get
                                          └─ ray.train.report: metrics + checkpoint part
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, CheckpointConsistencyMode, FailureConfig, RunConfig,
                       ScalingConfig)
from ray.train.collective import broadcast_from_rank_zero
from ray.train.torch import TorchTrainer
from rich.console import Console

from seminar import checkpoint, storage
from seminar.config import TrainConfig
from seminar.exchange import InProcessExchange
from seminar.progress import Progress, follow_history
from seminar.history import RunLog, new_run_name, read_history
from seminar.metrics import SERVED_MIOU, val_miou_key

from .object_store import DEFAULT_TIMEOUT_S, BoardStats, ExchangeBoard, PublishOnCollect, RayExchange
from .train_metrics import TrainMetrics
from .preflight import ClusterUnreachable, check_address, check_resources, check_storage, worker_resources

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- worker side


def train_fn_per_worker(config: dict) -> None:
    """The training function of one worker (Ray Train calls it with `train_loop_config`)."""
    from seminar.engine import WorkerContext, train_worker  # the method; imported on the worker

    cfg: TrainConfig = config["cfg"]
    board = config["board"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    num_students, num_replicas = cfg.num_students, cfg.resources.replicas_per_student
    torch.set_num_threads(cfg.resources.torch_threads or max(1, int(cfg.resources.cpus_per_worker)))

    ray_checkpoint = ray.train.get_checkpoint()
    resumed_step = _checkpoint_step(ray_checkpoint)
    if resumed_step >= cfg.optim.steps:
        # A finished run started again: nothing to train or download. Ray's result keeps its
        # last checkpoint and metrics.
        logger.info("run %s already reached step %d", cfg.storage.run_name, cfg.optim.steps)
        return

    # A fresh attempt number whenever the worker group (re)starts: rank 0 draws it from
    # the board, which forgets what the previous attempt published.
    attempt = broadcast_from_rank_zero(ray.get(board.new_attempt.remote()) if rank == 0 else None)

    device = ray.train.torch.get_device() if cfg.resources.gpus_per_worker > 0 else torch.device("cpu")
    if world_size == 1:
        # One process (ScalingConfig(num_workers=0), or a one-worker run): all students here.
        worker = WorkerContext(students=list(range(num_students)), device=device, attempt=attempt,
                               precision=cfg.resources.precision, channels_last=cfg.resources.channels_last)
        exchange = InProcessExchange(num_students)
    else:
        if world_size != cfg.num_workers:
            raise RuntimeError(f"{world_size} workers for a spec of {cfg.num_workers} "
                               f"({num_students} students x {num_replicas} replicas)")
        student, replica = divmod(rank, num_replicas)
        worker = WorkerContext(students=[student], replica=replica, num_replicas=num_replicas,
                               process_group=_student_process_group(num_students, num_replicas, rank),
                               device=device, attempt=attempt, precision=cfg.resources.precision,
                               channels_last=cfg.resources.channels_last)
        exchange = RayExchange(board, num_students, replica=replica, num_replicas=num_replicas,
                               attempt=attempt, timeout_s=config["exchange_timeout_s"])
    if not cfg.resources.exchange_lookahead:
        exchange = PublishOnCollect(exchange)

    with checkpoint_parts(ray_checkpoint, worker.students) as resume_from:
        reporter = Reporter(cfg, worker, rank, world_size, attempt, resumed_step)
        try:
            train_worker(cfg, worker, exchange, reporter, resume_from=resume_from)
        finally:
            exchange.close()


def _student_process_group(num_students: int, num_replicas: int, rank: int):
    """This worker's student's gradient group: its R replicas (None when R = 1).

    `new_group` is collective over the whole world: every rank creates every group, in the
    same order, and keeps its own.
    """
    if num_replicas == 1:
        return None
    mine = None
    for k in range(num_students):
        group = dist.new_group(ranks=list(range(k * num_replicas, (k + 1) * num_replicas)))
        if k == rank // num_replicas:
            mine = group
    return mine


class Reporter:
    """`report(metrics, checkpoint_dir)` for the engine: one `ray.train.report` per call.

    Every rank reports (the call is a barrier, and every rank's checkpoint part is
    uploaded into one merged directory). Rank 0's metrics are the ones Ray keeps with a
    checkpoint and the ones Tune sees, so rank 0 first gathers every worker's `s{k}/...`
    metrics and reports them all.
    """

    def __init__(self, cfg: TrainConfig, worker, rank: int, world_size: int, attempt: int, resumed_step: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_info = {"run/attempt": attempt, "run/resumed_from_step": resumed_step}
        # Only replica 0 of a student exports it: its replicas report the same reduced values.
        self.ray_metrics = TrainMetrics(cfg.storage.run_name or "run", worker.students) if worker.replica == 0 else None
        # One writer of the run's history, beside its checkpoints.
        self.log = RunLog(f"{cfg.storage.path.rstrip('/')}/{cfg.storage.run_name}",
                          cfg.storage.tensorboard) if rank == 0 else None

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if self.ray_metrics:
            self.ray_metrics.record(metrics)
        merged = {**self._gather(metrics), **self.run_info}
        if self.rank == 0 and SERVED_MIOU in merged and self.world_size > 1:
            # Rank 0 validated its own students only; with everyone's metrics it picks the
            # served network among all the teachers (an ensemble needs them in one process).
            from seminar.engine import choose_served  # the method; imported on the worker

            served = choose_served(self.cfg, merged)
            if checkpoint_dir:
                checkpoint.update_meta(checkpoint_dir, served=served, metrics=merged)
        if self.log:
            self.log.append(merged)
        ray_checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(merged, checkpoint=ray_checkpoint)
        if ray_checkpoint:
            # Ray registers a checkpoint only once its controller has polled every worker's
            # report (every ~2 s); a worker dying before that loses it. Waiting here keeps the
            # promise of losing at most one checkpoint interval.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def _gather(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return dict(metrics)
        everyone = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(dict(metrics), everyone, dst=0)
        if self.rank != 0:
            return dict(metrics)
        merged: dict[str, float] = {}
        for rank_metrics in everyone:  # rank order: replica 0 of each student comes first
            for key, value in rank_metrics.items():
                merged.setdefault(key, value)
        return merged


@contextmanager
def checkpoint_parts(ray_checkpoint: Checkpoint | None, students: list[int]) -> Iterator[str | None]:
    """A local directory holding what a worker resumes from: the checkpoint's meta.json
    and its own students' files. (`Checkpoint.as_directory()` would download every
    student's weights and optimizer state to every worker.)"""
    if ray_checkpoint is None:
        yield None
    elif isinstance(ray_checkpoint.filesystem, pafs.LocalFileSystem):
        yield ray_checkpoint.path
    else:
        with tempfile.TemporaryDirectory(prefix="seminar-resume-") as local:
            student_dirs = [checkpoint.student_dir(k) for k in students]
            for part in student_dirs:
                Path(local, part).mkdir()  # copy_files fills a directory, it does not make it
            for part in [checkpoint.META, *student_dirs]:
                pafs.copy_files(f"{ray_checkpoint.path}/{part}", f"{local}/{part}",
                                source_filesystem=ray_checkpoint.filesystem,
                                destination_filesystem=pafs.LocalFileSystem())
            yield local


def _checkpoint_step(ray_checkpoint: Checkpoint | None) -> int:
    """The step a run's checkpoint holds (-1 without one), read from its meta.json alone."""
    if ray_checkpoint is None:
        return -1
    try:
        with ray_checkpoint.filesystem.open_input_stream(f"{ray_checkpoint.path}/{checkpoint.META}") as f:
            return int(json.loads(f.read())["step"])
    except (OSError, KeyError, ValueError):
        return -1


# --------------------------------------------------------------------------- driver side


def storage_location(uri: str):
    """(storage_path, storage_filesystem) for RunConfig: the pyarrow filesystem and the path
    inside it for s3:// (Ray wants the path without its scheme then), else a local path."""
    if storage.is_s3(uri):
        fs, path = storage.filesystem(uri)
        return path, fs
    return str(Path(uri).expanduser().resolve()), None


def build_trainer(cfg: TrainConfig, run_name: str, callbacks=None, *, num_workers: int | None = None,
                  placement_strategy: str = "PACK", exchange_timeout_s: float = DEFAULT_TIMEOUT_S,
                  keep_checkpoints: int | None = 2, train_fn=train_fn_per_worker) -> TorchTrainer:
    """The `TorchTrainer` of one run: K×R workers, checkpoints under `storage.path/run_name`.

    `callbacks` are Ray Train callbacks (a Tune function trainable passes
    `ray.tune.integration.ray_train.TuneReportCallback()`). `num_workers=0` runs every
    student in this process (Ray Train's local mode, for tests: it persists no checkpoint). `placement_strategy="STRICT_SPREAD"`
    puts every worker on a different node. Starting a run name that exists resumes it from
    its latest checkpoint (a finished run just returns its result). On a multi-node cluster
    `storage.path` must be shared by all nodes: s3:// or a network file system. `train_fn`
    is what each worker runs (tests wrap `train_fn_per_worker` to kill a worker mid-run).
    """
    cfg = cfg.model_copy(deep=True)
    cfg.storage.run_name = run_name  # the checkpoints' metadata names the run
    # Ray Train's controller takes one report per worker each time it polls (every 2 s by
    # default) and `ray.train.report` blocks until then: poll faster so that frequent
    # metric reports do not slow training down. The driver passes this to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    res = worker_resources(cfg)
    storage_path, storage_filesystem = storage_location(cfg.storage.path)
    if storage_filesystem is None:
        cfg.storage.path = storage_path  # absolute: workers do not run in the driver's directory
    board = ExchangeBoard.remote(cfg.num_students, cfg.resources.replicas_per_student)
    return TorchTrainer(
        train_fn,
        train_loop_config={"cfg": cfg, "board": board, "exchange_timeout_s": exchange_timeout_s},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers if num_workers is None else num_workers,
            use_gpu=cfg.resources.gpus_per_worker > 0,
            resources_per_worker=res,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks,
        ),
    )


@dataclass
class RunSummary:
    run_name: str
    checkpoint: str  # local path or s3:// URI of the final merged checkpoint
    step: int
    metrics: dict[str, float] = field(repr=False)
    miou: dict[str, float] = field(default_factory=dict)  # "s{k}/student", "s{k}/teacher", "served"
    exchange: BoardStats | None = None  # what went through the exchange board


def summarize(result, cfg: TrainConfig, run_name: str, exchange: BoardStats | None = None) -> RunSummary:
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    path = result.checkpoint.path
    uri = f"s3://{path}" if storage.is_s3(cfg.storage.path) else path
    metrics = dict(result.metrics or {})
    miou = {}
    for k in range(cfg.num_students):
        for model in ("student", "teacher"):
            value = metrics.get(val_miou_key(k, model))
            if value is not None:
                miou[f"s{k}/{model}"] = float(value)
    if SERVED_MIOU in metrics:
        miou["served"] = float(metrics[SERVED_MIOU])
    return RunSummary(run_name, uri, int(metrics.get("step", -1)), metrics, miou, exchange)


def connect(address: str | None, cfg: TrainConfig) -> bool:
    """Connect this process to Ray; returns True when it started a local Ray itself.

    No address: an embedded single-node Ray with the machine's CPUs (at least as many
    logical CPUs as the spec's workers reserve: oversubscribing a small machine is slower
    but works) and its GPUs; the dashboard stays on (Train V2 needs it).
    """
    if ray.is_initialized():
        return False
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            token = "set" if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") else "not set"
            raise ClusterUnreachable(
                f"could not join the Ray cluster at {address!r} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                f"a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                f"or ~/.ray/auth_token here (RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE', 'not set')}, "
                f"RAY_AUTH_TOKEN {token}; see docs/cluster.md)") from None
        return False
    needed = cfg.num_workers * cfg.resources.cpus_per_worker
    cores = os.cpu_count() or 1
    if needed > cores:
        logger.warning("the spec reserves %g CPUs on a %d-core machine: workers share cores", needed, cores)
    ray.init(num_cpus=max(cores, int(needed + 0.999)), include_dashboard=True, log_to_driver=False)
    return True


def run_training(cfg: TrainConfig, address: str | None = None, console=None, **trainer_options) -> RunSummary:
    """Train a spec on a Ray cluster (`address`) or an embedded local Ray; return the
    summary (the caller prints it: `seminar train` as a table). A spec with `storage.run_name` of an existing run resumes it.

    `trainer_options` go to `build_trainer` (callbacks, placement_strategy, ...). Raises a
    `PreflightError` within seconds when the address, the storage or the resources are bad.
    """
    run_name = cfg.storage.run_name or new_run_name()
    check_address(address)  # before anything slow
    started_here = connect(address, cfg)
    try:
        check_storage(cfg.storage.path, run_name)
        if trainer_options.get("num_workers") != 0:
            check_resources(cfg, worker_resources(cfg), trainer_options.get("placement_strategy", "PACK"))
        trainer = build_trainer(cfg, run_name, **trainer_options)
        console = console or Console()
        r = cfg.resources.replicas_per_student
        console.print(f"run {run_name}: {cfg.num_students} students x {r} replica{'s' if r > 1 else ''} on Ray",
                      soft_wrap=True)
        run_dir = f"{cfg.storage.path.rstrip('/')}/{run_name}"
        start = max((int(h["step"]) for h in read_history(run_dir)), default=0)  # a resumed run's
        with follow_history(run_dir, Progress(cfg, start, console)):
            result = trainer.fit()
        board = trainer.train_loop_config["board"]
        return summarize(result, cfg, run_name, ray.get(board.stats.remote()))
    finally:
        if started_here:
            ray.shutdown()
