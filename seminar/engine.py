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

import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from .config import TrainConfig
from .data import build_dataset
from .data.base import IGNORE_INDEX
from .data.inspect import ClickPurity
from .data.transforms import SeminarViews
from .exchange import CompactPrediction, Exchange
from .method import EmaTeacher, fuse_pseudo_labels, student_losses
from .metrics import ConfusionMatrix
from .models import Ensemble, build_model

Reporter = Callable[[dict[str, float], "str | None"], None]


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


@dataclass
class Student:
    """One hosted student: its network (maybe DDP-wrapped), EMA teacher and optimizer."""

    index: int
    model: nn.Module  # what trains (DDP wrapper when replicated)
    net: nn.Module  # the bare network (what the teacher averages and checkpoints hold)
    teacher: EmaTeacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_student(cfg: TrainConfig, k: int, num_classes: int, ctx: WorkerContext) -> Student:
    spec = cfg.students[k]
    torch.manual_seed(spec.seed)  # same initial weights for student k wherever it runs
    net = build_model(spec.model, num_classes, spec.output_stride, spec.pretrained, spec.decoder_channels).to(ctx.device)
    if ctx.channels_last:
        net = net.to(memory_format=torch.channels_last)
    teacher = EmaTeacher(net, cfg.method.ema_decay, cfg.method.ema_warmup_steps)
    model = net
    if ctx.process_group is not None and dist.get_world_size(ctx.process_group) > 1:
        model = DistributedDataParallel(net, process_group=ctx.process_group)
    o = cfg.optim
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    # Poly decay, the DeepLab schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / o.steps) ** o.poly_power)
    return Student(k, model, net, teacher, optimizer, scheduler)


class StepBatches(torch.utils.data.Dataset):
    """Item i is this replica's share of the batch for step `start + i`.

    Every worker computes the same per-epoch permutation from the seed, so all students
    see the same samples in the same order with the same geometry; replica r takes the
    r-th slice of each batch. Resuming at a step needs nothing but the step.
    """

    def __init__(self, dataset, views: SeminarViews, students: list[int], batch_size: int,
                 replica: int, num_replicas: int, seed: int, start: int, stop: int):
        self.dataset, self.views, self.students = dataset, views, students
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.per_replica = batch_size // num_replicas
        self.offset = replica * self.per_replica
        self.steps_per_epoch = len(dataset) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(dataset)} images, fewer than optim.batch_size={batch_size}")

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        batch = order[pos * self.batch_size:(pos + 1) * self.batch_size]
        return epoch, batch[self.offset:self.offset + self.per_replica]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, indices = self.indices(self.start + i)
        items = [self.views(self.dataset[int(j)], epoch, int(j), self.students) for j in indices]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def iterate_batches(dataset: StepBatches, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                           persistent_workers=False, prefetch_factor=2 if workers else None)


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


def train_worker(cfg: TrainConfig, ctx: WorkerContext, exchange: Exchange | None, report: Reporter,
                 resume_from: str | None = None) -> dict[str, float]:
    """Train the students in `ctx.students` for `cfg.optim.steps` steps; see the module doc."""
    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    method, optim = cfg.method, cfg.optim
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    val_set = build_dataset(cfg.data, cfg.data.val_split)
    info = train_set.info
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=optim.seed)
    students = {k: build_student(cfg, k, info.num_classes, ctx) for k in ctx.students}
    start = 0
    saved_look_ahead: dict[int, dict] = {}
    if resume_from:
        for k, s in students.items():
            state = checkpoint.read_student(resume_from, k)
            s.net.load_state_dict(state["student"])
            s.teacher.module.load_state_dict(state["teacher"])
            s.optimizer.load_state_dict(state["optimizer"]["optimizer"])
            s.scheduler.load_state_dict(state["optimizer"]["scheduler"])
            start = state["step"]
            if state["look_ahead"] is not None:
                saved_look_ahead[k] = state["look_ahead"]
    if start >= optim.steps:
        return {}  # the run had already finished

    # Exchanging labels only makes sense with peers and a student-student loss.
    use_exchange = exchange is not None and cfg.num_students > 1 and method.w_ss > 0
    need_teacher_probs = method.w_ts > 0

    published: dict[int, CompactPrediction] = {}  # the latest look-ahead, kept for checkpoints

    def look_ahead(step: int, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Teacher probabilities of `batch` for the hosted students; publish them to peers."""
        weak = batch["image_weak"]
        teacher_probs = {}
        for k, s in students.items():
            if need_teacher_probs or (use_exchange and method.pseudo_from == "teacher"):
                with torch.no_grad(), ctx.autocast():
                    teacher_probs[k] = s.teacher(weak).float().softmax(1)
            if use_exchange:
                if method.pseudo_from == "teacher":
                    source = teacher_probs[k]
                else:  # CPS-like: the peers see the student's own (current) prediction
                    s.net.eval()
                    with torch.no_grad(), ctx.autocast():
                        source = s.net(weak).float().softmax(1)
                    s.net.train()
                published[k] = CompactPrediction.from_probs(source)
                exchange.publish(step, k, published[k])
        return teacher_probs

    def restore_look_ahead(step: int) -> dict[int, torch.Tensor]:
        """The look-ahead of `step` as the interrupted run made it (one EMA update older
        than the checkpoint's teacher): a resumed run continues with the same numbers."""
        teacher_probs = {}
        for k, saved in saved_look_ahead.items():
            if "teacher_probs" in saved:
                teacher_probs[k] = saved["teacher_probs"].to(ctx.device)
            if use_exchange:
                published[k] = CompactPrediction(saved["label"].numpy(), saved["confidence"].numpy())
                exchange.publish(step, k, published[k])
        return teacher_probs

    # A resumed run takes its first batch's teacher predictions from the checkpoint (made
    # before its last EMA update, as an uninterrupted run would have them), so every number
    # (data, augmentation, dropout, pseudo-labels, weights) continues exactly.
    stream = iterate_batches(
        StepBatches(train_set, views, ctx.students, optim.batch_size, ctx.replica, ctx.num_replicas,
                    optim.seed, start, optim.steps), cfg.resources.loader_workers)
    batch = _to_device(next(iter_ := iter(stream)), ctx.device)
    teacher_probs = restore_look_ahead(start) if len(saved_look_ahead) == len(students) else look_ahead(start, batch)

    sums: dict[str, float] = defaultdict(float)
    # Click purity of the batches as trained on (crops, flips, scale), where the training
    # images have masks: in every report, so the log says how clean the supervision is.
    purity = ClickPurity(cfg.data.click_radius)
    counted = 0
    last: dict[str, float] = {}
    per_replica = optim.batch_size // ctx.num_replicas
    for step in range(start, optim.steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        next_batch = next_teacher_probs = None
        if step + 1 < optim.steps:  # 1. look ahead
            next_batch = _to_device(next(iter_), ctx.device)
            next_teacher_probs = look_ahead(step + 1, next_batch)

        for position, (k, s) in enumerate(students.items()):
            pseudo_label, wait = None, 0.0
            if use_exchange:  # 2. peers' predictions for this batch
                t_wait = time.perf_counter()
                peers = exchange.collect(step, k)
                wait = time.perf_counter() - t_wait
                pseudo_label, _ = fuse_pseudo_labels(peers, method, info.num_classes,
                                                     batch["click_map"], batch["valid"])
            # 3. train the student on its strong view. Dropout's randomness is keyed by
            # (student, replica, step), so a run gives the same numbers in one process, on a
            # cluster, and after a resume.
            torch.manual_seed(hash((optim.seed, k, ctx.replica, step)) % 2**63)
            s.model.train()
            with ctx.autocast():
                logits = s.model(batch["image_strong"][:, position]).float()
            losses = student_losses(method, step, logits, batch, teacher_probs.get(k), pseudo_label)
            s.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            s.optimizer.step()
            s.scheduler.step()
            s.teacher.update(s.net, step)

            for name, value in losses.items():
                sums[f"s{k}/{name}"] += value.item()
            for name, value in instruments(batch, logits, pseudo_label).items():
                sums[f"s{k}/{name}"] += value
            sums[f"s{k}/exchange_wait"] += wait

        add_click_purity(purity, batch)
        step_time = time.perf_counter() - t0
        # CPU seconds of this whole process (torch's threads, Ray's): against step_time it
        # tells work done from time spent waiting for a core, a GPU or data.
        step_cpu_time = time.process_time() - cpu0
        for k in students:
            sums[f"s{k}/step_time"] += step_time
            sums[f"s{k}/step_cpu_time"] += step_cpu_time
            sums[f"s{k}/images_per_s"] += per_replica / step_time
        counted += 1
        batch, teacher_probs = next_batch, next_teacher_probs

        done = step + 1
        is_eval = done % cfg.schedule.eval_every == 0 or done == optim.steps
        is_ckpt = done % cfg.schedule.checkpoint_every == 0 or done == optim.steps
        if done % cfg.schedule.log_every == 0 or is_eval or is_ckpt:
            last = {name: value / counted for name, value in sums.items()}
            last.update(step=done, epoch=done * optim.batch_size / len(train_set))
            if purity.drawn:
                last.update({"data/click_purity": purity.overall,
                             **{f"data/click_purity/{c}": v for c, v in purity.per_class().items()}})
            purity = ClickPurity(cfg.data.click_radius)
            sums.clear()
            counted = 0
            if is_eval:
                last.update(validate(cfg, students, val_set, views, info.num_classes, ctx))
            if is_ckpt:
                directory = tempfile.mkdtemp(prefix="seminar-ckpt-")
                try:
                    write_checkpoint(directory, cfg, students, info, done, last, ctx,
                                     look_ahead_state(teacher_probs, published))
                    report(dict(last), directory)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
            else:
                report(dict(last), None)
    return last


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


def validate(cfg: TrainConfig, students: dict[int, Student], val_set, views: SeminarViews, num_classes: int,
             ctx: WorkerContext) -> dict[str, float]:
    """Every hosted student's and teacher's val mIoU and per-class IoU (and, with every
    student here, their teachers' ensemble's); then the served network's as `val/...`."""
    models = {}
    for k, s in students.items():
        models[f"s{k}/val_miou_student"] = s.net
        models[f"s{k}/val_miou_teacher"] = s.teacher
    if len(students) == cfg.num_students > 1:
        models["val_miou_teacher_ensemble"] = Ensemble([s.teacher for s in students.values()])
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
    metrics["val/miou"] = metrics[prefix]
    for key in [k for k in metrics if k.startswith(prefix + "/iou/")]:
        metrics["val/iou/" + key.rsplit("/", 1)[1]] = metrics[key]
    return served


def served_metric(network: str) -> str:
    """The metric that scores a served network (`teacher_<k>`, `teacher_ensemble`, `primary_student`)."""
    if network == "primary_student":
        return "s0/val_miou_student"
    if network == "teacher_ensemble":
        return "val_miou_teacher_ensemble"
    return f"s{network.removeprefix('teacher_')}/val_miou_teacher"


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


def look_ahead_state(teacher_probs: dict[int, torch.Tensor] | None,
                     published: dict[int, CompactPrediction]) -> dict[int, dict[str, torch.Tensor]]:
    """What the look-ahead made for the next step, per student, as tensors for a checkpoint."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, probs in (teacher_probs or {}).items():
        state.setdefault(k, {})["teacher_probs"] = probs.cpu()
    for k, pred in published.items():
        state.setdefault(k, {}).update(label=torch.from_numpy(pred.label), confidence=torch.from_numpy(pred.confidence))
    return state


def write_checkpoint(directory: str, cfg: TrainConfig, students: dict[int, Student], info, step: int,
                     metrics: dict[str, float], ctx: WorkerContext,
                     look_ahead: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    if ctx.replica != 0:
        return  # replicas hold identical weights; replica 0 writes them
    for k, s in students.items():
        checkpoint.write_student(directory, k, step, s.net, s.teacher.module,
                                 {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict()},
                                 (look_ahead or {}).get(k))
    if 0 in students:
        served = served_network(cfg, metrics) if "val/miou" in metrics else None
        checkpoint.write_meta(directory, cfg, info, step, metrics, served)


def write_initial_checkpoint(directory: str, cfg: TrainConfig, metrics: dict[str, float] | None = None) -> str:
    """The spec's students before their first step, saved as training saves a checkpoint:
    a servable model without training, for tests and benchmarks."""
    info = build_dataset(cfg.data, cfg.data.train_split).info
    ctx = WorkerContext(students=list(range(cfg.num_students)))
    students = {k: build_student(cfg, k, info.num_classes, ctx) for k in ctx.students}
    write_checkpoint(directory, cfg, students, info, 0, metrics or {}, ctx)
    return directory
