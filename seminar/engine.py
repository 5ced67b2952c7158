"""The training loop, one per worker, for both worlds.

A worker hosts some of the K students (all of them in-process, one each on a Ray
cluster) and one data-parallel replica of them. Each step:

  1. look ahead: every hosted teacher predicts batch t+1 (weak view) and publishes its
     compact prediction, so that peers' predictions are already there when needed;
  2. collect the peers' predictions for batch t and fuse them into pseudo-labels;
  3. train each hosted student on its strong view of batch t; update its EMA teacher.

The exchange is an interface (`seminar.exchange`): in-process a dict, on Ray the object
store. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, registry
from .config import ScheduleConfig, TrainConfig
from .data import build_dataset
from .data.base import IGNORE_INDEX, DatasetError
from .data.inspect import ClickPurity
from .data.transforms import SeminarViews
from .exchange import CompactPrediction, Exchange
from .method import CutMix, EmaTeacher, cutmix_boxes, fuse_pseudo_labels, student_losses
from .metrics import ENSEMBLE_MIOU, SERVED_IOU, SERVED_MIOU, ConfusionMatrix, student_key, val_miou_key
from .models import Ensemble, build_model

Reporter = Callable[[dict[str, float], "str | None"], None]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus() -> int:
    """The CPUs this process may use: the least of its CPU affinity, its cgroup's CPU quota
    (a container's share) and OMP_NUM_THREADS (Ray's allotment to a worker). torch's default
    counts the machine's cores, and threads beyond the process's share wait for one."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isascii() and omp.isdigit() and int(omp) > 0:
        cpus = min(cpus, int(omp))
    return max(1, cpus)


@dataclass
class WorkerContext:
    students: list[int]
    replica: int = 0
    num_replicas: int = 1
    process_group: "dist.ProcessGroup | None" = None  # this student's replicas
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attempt: int = 0
    precision: str = "fp32"  # resources.precision
    channels_last: bool = False  # resources.channels_last

    def autocast(self) -> torch.autocast:
        """Where forwards run: under bfloat16 autocast with resources.precision=bf16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


class StudentTask:
    """One hosted student as a training task: its network (DDP-wrapped when replicated),
    its EMA teacher (built with its decay and warm-up), optimizer and LR schedule; its
    look-ahead (the teacher's prediction of a batch, published to the peers one step early)
    and its training step (the peers' predictions fused into pseudo-labels, the losses, the
    updates), which returns its losses and instruments by name."""

    def __init__(self, cfg: TrainConfig, k: int, num_classes: int, ctx: WorkerContext,
                 exchange: Exchange | None = None):
        spec, o = cfg.students[k], cfg.optim
        self.k, self.cfg, self.ctx, self.num_classes = k, cfg, ctx, num_classes
        torch.manual_seed(spec.seed)  # same initial weights for student k wherever it runs
        net = build_model(spec.model, num_classes, spec.output_stride,
                          spec.pretrained if spec.init_from is None else None, spec.decoder_channels,
                          cfg.method.feature_dropout)
        if spec.init_from is not None:
            weights, _ = registry.teacher_weights(spec.init_from, k)
            net.load_state_dict(weights)
        net = net.to(ctx.device)
        if ctx.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net  # the bare network (what the teacher averages and checkpoints hold)
        self.teacher = EmaTeacher(net, cfg.method.ema_decay, cfg.method.ema_warmup_steps)
        self.model = net  # what trains (DDP wrapper when replicated)
        if ctx.process_group is not None and dist.get_world_size(ctx.process_group) > 1:
            self.model = DistributedDataParallel(net, process_group=ctx.process_group)
        if o.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum,
                                             weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        # Poly decay, the DeepLab schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, 1.0 - s / o.steps) ** o.poly_power)
        # Exchanging labels only makes sense with peers and a student-student loss.
        self.exchange = exchange if exchange is not None and cfg.num_students > 1 and cfg.method.w_ss > 0 else None
        self.published: CompactPrediction | None = None  # the latest look-ahead, kept for checkpoints

    def look_ahead(self, step: int, weak: torch.Tensor) -> torch.Tensor | None:
        """The teacher's probabilities of `weak` (the batch of `step`) when `loss_ts` or the
        exchange needs them; the pseudo-label source's prediction published to the peers."""
        method, probs = self.cfg.method, None
        if method.w_ts > 0 or (self.exchange is not None and method.pseudo_from == "teacher"):
            with torch.no_grad(), self.ctx.autocast():
                probs = self.teacher(weak).float().softmax(1)
        if self.exchange is not None:
            if method.pseudo_from == "teacher":
                source = probs
            else:  # CPS-like: the peers see the student's own (current) prediction
                self.net.eval()
                with torch.no_grad(), self.ctx.autocast():
                    source = self.net(weak).float().softmax(1)
                self.net.train()
            self.published = CompactPrediction.from_probs(source)
            self.exchange.publish(step, self.k, self.published)
        return probs

    def restore_look_ahead(self, step: int, saved: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The look-ahead of `step` as the interrupted run made it (one EMA update older than
        the checkpoint's teacher): a resumed run continues with the same numbers."""
        if self.exchange is not None:
            self.published = CompactPrediction(saved["label"].numpy(), saved["confidence"].numpy())
            self.exchange.publish(step, self.k, self.published)
        return saved["teacher_probs"].to(self.ctx.device) if "teacher_probs" in saved else None

    def train_step(self, step: int, batch: dict[str, torch.Tensor], position: int,
                   teacher_probs: torch.Tensor | None, mix: CutMix | None = None) -> dict[str, float]:
        """One step on the student's strong view of `batch` (CutMixed by `mix`, its targets
        with it); its losses and instruments."""
        pseudo_label, wait = None, 0.0
        if self.exchange is not None:  # the peers' predictions for this batch
            t_wait = time.perf_counter()
            peers = self.exchange.collect(step, self.k)
            wait = time.perf_counter() - t_wait
            pseudo_label, _ = fuse_pseudo_labels(peers, self.cfg.method, self.num_classes,
                                                 batch["click_map"], batch["valid"])
        shares = teacher_shares(teacher_probs, batch) if teacher_probs is not None else {}
        image = batch["image_strong"][:, position]
        if mix is not None:
            image, teacher_probs, pseudo_label = (mix(x) for x in (image, teacher_probs, pseudo_label))
            batch = {**batch, **{key: mix(batch[key]) for key in ("click_map", "valid", "mask", "image_rgb")}}
        # Dropout's randomness is keyed by (student, replica, step), so a run gives the same
        # numbers in one process, on a cluster, and after a resume.
        torch.manual_seed(hash((self.cfg.optim.seed, self.k, self.ctx.replica, step)) % 2**63)
        self.model.train()
        with self.ctx.autocast():
            logits = self.model(image).float()
        losses = student_losses(self.cfg.method, step, logits, batch, teacher_probs, pseudo_label)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.teacher.update(self.net, step)
        return {**{name: value.item() for name, value in losses.items()},
                **instruments(batch, logits, pseudo_label), **shares, "exchange_wait": wait}

    def load(self, state: dict) -> None:
        """A checkpoint's state of this student (`checkpoint.read_student`)."""
        self.net.load_state_dict(state["student"])
        self.teacher.module.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(state["optimizer"]["scheduler"])


def stream_batch(pool: np.ndarray, batch_size: int, step: int, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Batch `step` of an endless stream over `pool` (image indices): the stream is one
    seeded permutation of the pool per epoch, end to end, cut into batches of `batch_size`
    (a pool smaller than a batch spans epochs). Returns (epoch, index) per item."""
    position = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = position // len(pool)
    indices = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        order = pool[np.random.default_rng([*seed, int(epoch)]).permutation(len(pool))]
        here = epochs == epoch
        indices[here] = order[position[here] % len(pool)]
    return epochs, indices


class StepBatches(torch.utils.data.Dataset):
    """Item i is this replica's share of the batch for step `start + i`: `batch_size` clicked
    images from one stream, then `unlabelled_batch_size` unclicked ones from another (none
    when there are none, or when no term would use them); `labelled` tells them apart.

    Every worker computes the same streams from the seed, so all students see the same
    samples in the same order with the same geometry; replica r takes the r-th slice of
    each stream's batch. Resuming at a step needs nothing but the step.
    """

    def __init__(self, dataset, views: SeminarViews, students: list[int], batch_size: int, unlabelled_batch_size: int,
                 replica: int, num_replicas: int, seed: int, start: int, stop: int):
        self.dataset, self.views, self.students = dataset, views, students
        self.seed, self.start, self.stop = seed, start, stop
        self.labelled, self.unlabelled = np.flatnonzero(dataset.clicked), np.flatnonzero(~dataset.clicked)
        if len(self.labelled) == 0:
            raise ValueError(f"none of the {len(dataset)} training images has clicks")
        self.sizes = (batch_size, unlabelled_batch_size if len(self.unlabelled) else 0)
        self.replica, self.num_replicas = replica, num_replicas

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self, step: int) -> list[tuple[int, int, bool]]:
        """This replica's (epoch, image index, labelled) for every item of the step's batch."""
        items = []
        for stream, (pool, size) in enumerate(zip((self.labelled, self.unlabelled), self.sizes)):
            if size == 0:
                continue
            epochs, indices = stream_batch(pool, size, step, [self.seed, stream])
            share = slice(self.replica * size // self.num_replicas, (self.replica + 1) * size // self.num_replicas)
            items += [(int(e), int(j), stream == 0) for e, j in zip(epochs[share], indices[share])]
        return items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items = [(self.views(self.dataset[j], epoch, j, self.students), labelled)
                 for epoch, j, labelled in self.indices(self.start + i)]
        batch = {key: torch.stack([it[key] for it, _ in items]) for key in items[0][0]}
        batch["labelled"] = torch.tensor([labelled for _, labelled in items])
        return batch


def iterate_batches(dataset: StepBatches, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches, loaded `workers` processes ahead (prefetch: a step does not wait for a
    remote dataset's files once they are cached, nor for decoding)."""
    try:
        yield from torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                               persistent_workers=False, prefetch_factor=2 if workers else None)
    except DatasetError as e:  # a file gone or unreadable mid-run: its one line, not the worker's traceback
        raise DatasetError(str(e).strip().splitlines()[-1].removeprefix(f"{DatasetError.__module__}.DatasetError: ")
                           ) from None


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], dataset, views: SeminarViews, num_classes: int, ctx: WorkerContext,
             batch_size: int = 8) -> dict[str, ConfusionMatrix]:
    """Confusion matrices of several models over this replica's shard of `dataset`,
    summed over the student's replicas."""
    matrices = {name: ConfusionMatrix(num_classes) for name in models}
    for m in models.values():
        m.eval()
    shard = range(ctx.replica, len(dataset), ctx.num_replicas)
    pending: list[dict[str, torch.Tensor]] = []

    def flush():
        images = torch.stack([p["image_weak"] for p in pending]).to(ctx.device)
        target = torch.stack([p["mask"] for p in pending])
        for name, m in models.items():
            with ctx.autocast():
                logits = m(images)
            matrices[name].update(target, logits.argmax(1).cpu())
        pending.clear()

    for i in shard:
        item = views(dataset[i], 0, i, [], train=False)
        if pending and (item["image_weak"].shape != pending[0]["image_weak"].shape or len(pending) == batch_size):
            flush()
        pending.append(item)
    if pending:
        flush()
    if ctx.num_replicas > 1:  # only this student's replicas: other workers host other students
        for cm in matrices.values():
            cm.all_reduce(ctx.process_group)
    return matrices


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(frozen=True)
class Due:
    """What the schedule asks for after a step: a report (mean metrics since the last one),
    an evaluation, a checkpoint."""

    report: bool
    evaluate: bool
    checkpoint: bool


def due_after(schedule: ScheduleConfig, steps: int, done: int) -> Due:
    """The schedule after `done` steps of `steps`: evaluations and checkpoints every
    `eval_every` / `checkpoint_every` steps and at the end; a report at each of those and
    every `log_every` steps."""
    last = done == steps
    evaluate = done % schedule.eval_every == 0 or last
    checkpoint = done % schedule.checkpoint_every == 0 or last
    return Due(done % schedule.log_every == 0 or evaluate or checkpoint, evaluate, checkpoint)


def run_schedule(schedule: ScheduleConfig, steps: int, start: int, train_step: Callable[[int], dict[str, float]],
                 on_report: Callable[[dict[str, float], Due], None]) -> dict[str, float]:
    """The loop: `train_step(step)` for each step from `start` (0, or a checkpoint's step)
    to `steps`; after each step the schedule marks, `on_report(metrics, due)` with the mean of
    each step metric since the last report and `step` (the hook adds evaluation metrics, writes
    the checkpoint, reports). Returns the last report's metrics."""
    sums: dict[str, float] = defaultdict(float)
    counted = 0
    last: dict[str, float] = {}
    for step in range(start, steps):
        for name, value in train_step(step).items():
            sums[name] += value
        counted += 1
        due = due_after(schedule, steps, step + 1)
        if due.report:
            last = {name: value / counted for name, value in sums.items()}
            last["step"] = step + 1
            sums.clear()
            counted = 0
            on_report(last, due)
    return last


def train_worker(cfg: TrainConfig, ctx: WorkerContext, exchange: Exchange | None, report: Reporter,
                 resume_from: str | None = None) -> dict[str, float]:
    """Train the students in `ctx.students` for `cfg.optim.steps` steps; see the module doc."""
    torch.set_num_threads(cfg.resources.torch_threads or usable_cpus())
    optim = cfg.optim
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    val_set = build_dataset(cfg.data, cfg.data.val_split, clicks=False)
    info = train_set.info
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=optim.seed)
    tasks = {k: StudentTask(cfg, k, info.num_classes, ctx, exchange) for k in ctx.students}
    start = 0
    saved_look_ahead: dict[int, dict] = {}
    if resume_from:
        for k, task in tasks.items():
            state = checkpoint.read_student(resume_from, k)
            task.load(state)
            start = state["step"]
            if state["look_ahead"] is not None:
                saved_look_ahead[k] = state["look_ahead"]
    if start >= optim.steps:
        return {}  # the run had already finished

    # A resumed run takes its first batch's teacher predictions from the checkpoint (made
    # before its last EMA update, as an uninterrupted run would have them), so every number
    # (data, augmentation, dropout, pseudo-labels, weights) continues exactly.
    # Unclicked images are drawn only where a term learns from them.
    unlabelled_batch_size = 0
    if cfg.method.w_ts > 0 or cfg.method.w_ss > 0:
        unlabelled_batch_size = optim.unlabelled_batch_size or optim.batch_size
    step_batches = StepBatches(train_set, views, ctx.students, optim.batch_size, unlabelled_batch_size,
                               ctx.replica, ctx.num_replicas, optim.seed, start, optim.steps)
    batches = iter(iterate_batches(step_batches, cfg.resources.loader_workers))
    batch = _to_device(next(batches), ctx.device)
    if len(saved_look_ahead) == len(tasks):
        teacher_probs = {k: task.restore_look_ahead(start, saved_look_ahead[k]) for k, task in tasks.items()}
    else:
        teacher_probs = {k: task.look_ahead(start, batch["image_weak"]) for k, task in tasks.items()}

    # Click purity of the batches as trained on (crops, flips, scale), where the training
    # images have masks: in every report, so the log says how clean the supervision is.
    purity = ClickPurity(cfg.data.click_radius)
    per_replica = sum(step_batches.sizes) // ctx.num_replicas

    def train_step(step: int) -> dict[str, float]:
        nonlocal batch, teacher_probs
        t0, cpu0, thread_cpu0 = time.perf_counter(), time.process_time(), time.thread_time()
        next_batch = next_teacher_probs = None
        if step + 1 < optim.steps:  # 1. look ahead: the teachers predict the next batch
            next_batch = _to_device(next(batches), ctx.device)
            next_teacher_probs = {k: task.look_ahead(step + 1, next_batch["image_weak"]) for k, task in tasks.items()}
        metrics = click_shares(batch, info.num_classes)
        mix = cutmix_plan(cfg, step, ctx.replica, batch["labelled"], batch["click_map"].shape)
        for position, (k, task) in enumerate(tasks.items()):  # 2-3. the peers' labels, a step
            for name, value in task.train_step(step, batch, position, teacher_probs[k], mix).items():
                metrics[student_key(k, name)] = value
        add_click_purity(purity, batch)
        step_time = time.perf_counter() - t0
        # CPU seconds of this whole process (torch's threads, Ray's): against step_time it
        # tells work done from time spent waiting for a core, a GPU or data.
        step_cpu_time = time.process_time() - cpu0
        # ... and of this thread alone: the training itself at torch_threads=1; the rest of
        # step_cpu_time is other threads (Ray's, torch's pool, a loader's)
        step_thread_cpu_time = time.thread_time() - thread_cpu0
        for k in tasks:
            metrics.update({student_key(k, "step_time"): step_time, student_key(k, "step_cpu_time"): step_cpu_time,
                            student_key(k, "step_thread_cpu_time"): step_thread_cpu_time,
                            student_key(k, "images_per_s"): per_replica / step_time})
        batch, teacher_probs = next_batch, next_teacher_probs
        return metrics

    def on_report(metrics: dict[str, float], due: Due) -> None:
        nonlocal purity
        metrics["epoch"] = metrics["step"] * optim.batch_size / len(step_batches.labelled)  # of the clicked images
        warn_collapse(cfg, metrics, info.classes, tasks)
        if purity.drawn:
            metrics.update({"data/click_purity": purity.overall,
                            **{f"data/click_purity/{c}": v for c, v in purity.per_class().items()}})
        purity = ClickPurity(cfg.data.click_radius)
        if due.evaluate:
            metrics.update(validate(cfg, tasks, val_set, views, info.num_classes, ctx))
        if not due.checkpoint:
            report(dict(metrics), None)
            return
        directory = tempfile.mkdtemp(prefix="seminar-ckpt-")
        try:
            write_checkpoint(directory, cfg, tasks, info, int(metrics["step"]), metrics, ctx,
                             look_ahead_state(teacher_probs, tasks))
            report(dict(metrics), directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    return run_schedule(cfg.schedule, optim.steps, start, train_step, on_report)


def cutmix_plan(cfg: TrainConfig, step: int, replica: int, labelled: torch.Tensor,
                shape: torch.Size) -> CutMix | None:
    """This step's CutMix between the unclicked images of the batch (each takes its box from
    the next one), drawn from (seed, step, replica): the same for every student, in one
    process or on a cluster, and after a resume. None when off or with fewer than two."""
    unlabelled = torch.nonzero(~labelled.cpu()).flatten()
    if cfg.method.cutmix_prob == 0 or len(unlabelled) < 2:
        return None
    rng = np.random.default_rng([cfg.optim.seed, step, replica, 0xC0])
    box = torch.zeros(tuple(shape), dtype=torch.bool)
    box[unlabelled] = torch.from_numpy(cutmix_boxes(rng, len(unlabelled), shape[1], shape[2], cfg.method.cutmix_prob))
    partner = torch.arange(shape[0])
    partner[unlabelled] = unlabelled.roll(-1)
    return CutMix(box.to(labelled.device), partner)


# A teacher that gives one class this share of the unclicked pixels is collapsing (CamVid's
# largest class, road, holds 32% of the pixels; VOC's background about 70%).
COLLAPSE_SHARE = 0.8
log = logging.getLogger(__name__)


def class_shares(labels: torch.Tensor, num_classes: int, prefix: str) -> dict[str, float]:
    """`<prefix>/<c>`: each class's share of `labels` (class indices)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes].float()
    return {f"{prefix}/{c}": v for c, v in enumerate((counts / counts.sum().clamp(min=1)).tolist())}


def click_shares(batch: dict[str, torch.Tensor], num_classes: int) -> dict[str, float]:
    """`data/click_share/<c>`: each class's share of the batch's clicked pixels."""
    clicks = batch["click_map"][batch["click_map"] != IGNORE_INDEX]
    return class_shares(clicks, num_classes, "data/click_share")


@torch.no_grad()
def teacher_shares(teacher_probs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """`teacher_share/<c>`: each class's share of the teacher's labels on the unclicked valid
    pixels of the unclicked images (of every image when the batch has none)."""
    images = ~batch["labelled"] if not batch["labelled"].all() else batch["labelled"]
    pixels = (batch["click_map"] == IGNORE_INDEX) & batch["valid"] & images.view(-1, 1, 1)
    return class_shares(teacher_probs.argmax(1)[pixels], teacher_probs.shape[1], "teacher_share")


def warn_collapse(cfg: TrainConfig, metrics: dict[str, float], classes: tuple[str, ...],
                  tasks: dict[int, "StudentTask"]) -> None:
    """Warn when a teacher's labels on the unclicked pixels have gone to one class, once the
    teacher has warmed up and the terms have ramped up (a new network's labels often are one
    class for a few steps)."""
    if metrics["step"] < max(cfg.method.ema_warmup_steps, cfg.method.rampup_steps):
        return
    for k in tasks:
        shares = [metrics.get(student_key(k, f"teacher_share/{c}"), 0.0) for c in range(len(classes))]
        top = int(np.argmax(shares))
        if shares[top] >= COLLAPSE_SHARE:
            clicked = metrics.get(f"data/click_share/{top}", float("nan"))
            log.warning(f"step {int(metrics['step'])}: student {k}'s teacher labels {shares[top]:.0%} of the unclicked "
                        f"pixels {classes[top]} (clicks: {clicked:.0%} {classes[top]}): its pseudo-labels are "
                        f"collapsing to one class")


def add_click_purity(purity: ClickPurity, batch: dict[str, torch.Tensor]) -> None:
    """Add a batch's click disks to `purity`, for the images with a ground-truth mask."""
    for click_map, mask in zip(batch["click_map"].cpu().numpy(), batch["mask"].cpu().numpy()):
        if (mask != IGNORE_INDEX).any():
            purity.add_disks(click_map, mask)


@torch.no_grad()
def instruments(batch: dict[str, torch.Tensor], logits: torch.Tensor,
                pseudo_label: torch.Tensor | None) -> dict[str, float]:
    """What a student's step did on the unclicked valid pixels: `pseudo_frac`, the share the
    pseudo-label covers; and where the training images have ground-truth masks, the
    `diag_*` accuracies of the pseudo-label and of the student there. The masks are read
    for these diagnostics only, never for training."""
    unclicked = (batch["click_map"] == IGNORE_INDEX) & batch["valid"]
    mask = batch["mask"]
    known = unclicked & (mask != IGNORE_INDEX)
    out = {}
    if known.any():
        out["diag_student_acc"] = float((logits.argmax(1)[known] == mask[known]).float().mean())
    if pseudo_label is not None:
        covered = pseudo_label != IGNORE_INDEX
        out["pseudo_frac"] = float(covered.sum() / unclicked.sum().clamp(min=1))
        checked = covered & known
        if checked.any():
            out["diag_pseudo_acc"] = float((pseudo_label[checked] == mask[checked]).float().mean())
    return out


def validate(cfg: TrainConfig, students: dict[int, StudentTask], val_set, views: SeminarViews, num_classes: int,
             ctx: WorkerContext) -> dict[str, float]:
    """Every hosted student's and teacher's val mIoU and per-class IoU (and, with every
    student here, their teachers' ensemble's); then the served network's as `val/...`."""
    models = {}
    for k, s in students.items():
        models[val_miou_key(k, "student")] = s.net
        models[val_miou_key(k, "teacher")] = s.teacher
    if len(students) == cfg.num_students > 1:
        models[ENSEMBLE_MIOU] = Ensemble([s.teacher for s in students.values()])
    out = {}
    for name, cm in evaluate(models, val_set, views, num_classes, ctx).items():
        out[name] = cm.miou()
        out.update({f"{name}/iou/{i}": v for i, v in enumerate(cm.iou().tolist())})
    if 0 in students:
        choose_served(cfg, out)
    return out


def choose_served(cfg: TrainConfig, metrics: dict[str, float]) -> str:
    """Pick the served network from evaluated metrics (see `served_network`), copy its mIoU and
    per-class IoU to `val/miou` and `val/iou/<c>` in `metrics`, and return its name."""
    served = served_network(cfg, metrics)
    prefix = served_metric(served)
    metrics[SERVED_MIOU] = metrics[prefix]
    for key in [k for k in metrics if k.startswith(prefix + "/iou/")]:
        metrics[SERVED_IOU + key.rsplit("/", 1)[1]] = metrics[key]
    return served


def served_metric(network: str) -> str:
    """The metric that scores a served network (`teacher_<k>`, `teacher_ensemble`, `primary_student`)."""
    if network == "primary_student":
        return val_miou_key(0, "student")
    if network == "teacher_ensemble":
        return ENSEMBLE_MIOU
    return val_miou_key(int(network.removeprefix("teacher_")), "teacher")


def served_network(cfg: TrainConfig, metrics: dict[str, float]) -> str:
    """Which network a checkpoint serves: `teacher_<k>`, `teacher_ensemble` or `primary_student`.

    `best_teacher` takes the teacher, or the teachers' ensemble, with the highest val mIoU
    among those this worker evaluated (all of them in one process; on Ray, rank 0's)."""
    choice = cfg.method.inference
    if choice != "best_teacher":
        return "teacher_0" if choice == "primary_teacher" else choice
    candidates = [f"teacher_{k}" for k in range(cfg.num_students)] + ["teacher_ensemble"]
    scored = [c for c in candidates if served_metric(c) in metrics]
    return max(scored, key=lambda c: metrics[served_metric(c)]) if scored else "teacher_0"


def look_ahead_state(teacher_probs: dict[int, torch.Tensor | None] | None,
                     tasks: dict[int, StudentTask]) -> dict[int, dict[str, torch.Tensor]]:
    """What the look-ahead made for the next step, per student, as tensors for a checkpoint."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, probs in (teacher_probs or {}).items():
        if probs is not None:
            state.setdefault(k, {})["teacher_probs"] = probs.cpu()
    for k, task in tasks.items():
        if task.published is not None:
            state.setdefault(k, {}).update(label=torch.from_numpy(task.published.label),
                                           confidence=torch.from_numpy(task.published.confidence))
    return state


def write_checkpoint(directory: str, cfg: TrainConfig, students: dict[int, StudentTask], info, step: int,
                     metrics: dict[str, float], ctx: WorkerContext,
                     look_ahead: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    if ctx.replica != 0:
        return  # replicas hold identical weights; replica 0 writes them
    for k, s in students.items():
        checkpoint.write_student(directory, k, step, s.net, s.teacher.module,
                                 {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict()},
                                 (look_ahead or {}).get(k))
    if 0 in students:
        served = served_network(cfg, metrics) if SERVED_MIOU in metrics else None
        checkpoint.write_meta(directory, cfg, info, step, metrics, served)


def write_initial_checkpoint(directory: str, cfg: TrainConfig, metrics: dict[str, float] | None = None) -> str:
    """The spec's students before their first step, saved as training saves a checkpoint:
    a servable model without training, for tests and benchmarks."""
    info = build_dataset(cfg.data, cfg.data.train_split).info
    ctx = WorkerContext(students=list(range(cfg.num_students)))
    students = {k: StudentTask(cfg, k, info.num_classes, ctx) for k in ctx.students}
    write_checkpoint(directory, cfg, students, info, 0, metrics or {}, ctx)
    return directory
