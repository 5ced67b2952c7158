"""One seminar training step against one plain pCE step of the same student.

The seminar step adds, on the worker that trains student k: its EMA teacher's forward on
the weak view (the look-ahead prediction, also used by loss_ts), compacting it for the
peers, fusing the peers' predictions into a pseudo-label, the two extra losses and the
EMA update. The limit is about 4/3 (one extra forward without backward). Both steps run
interleaved in one process, on the same batches, so machine load hits both alike.

    .venv/bin/python bench/step.py                       # DeepLabV3+ ResNet-18, 96x96, batch 8
    .venv/bin/python bench/step.py --size 240 320 --model deeplabv3plus_resnet18 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seminar.config import TrainConfig
from seminar.data import build_dataset
from seminar.data.transforms import SeminarViews
from seminar.engine import WorkerContext, build_student
from seminar.exchange import CompactPrediction
from seminar.method import fuse_pseudo_labels, student_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3plus_resnet18")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 96), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    h, w = args.size
    cfg = TrainConfig.model_validate({
        "data": {"crop_size": [h, w], "synthetic": {"image_size": max(h, w), "num_train": args.batch * 4}},
        "students": [{"model": args.model, "seed": 0}, {"model": args.model, "seed": 1}],
        "optim": {"batch_size": args.batch, "steps": 10_000},
        "method": {"ss_start": 0, "rampup_steps": 0},
    })
    dataset = build_dataset(cfg.data, "train")
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=0)
    items = [views(dataset[i], 0, i, [0]) for i in range(args.batch)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    ctx = WorkerContext(students=[0])
    n = dataset.info.num_classes
    plain = build_student(cfg, 0, n, ctx)
    seminar = build_student(cfg, 0, n, ctx)
    peer = build_student(cfg, 1, n, ctx)
    with torch.no_grad():
        peer_pred = CompactPrediction.from_probs(peer.teacher(batch["image_weak"]).softmax(1))

    def plain_step(step: int) -> None:
        logits = plain.model(batch["image_strong"][:, 0])
        loss = student_losses(cfg.method.model_copy(update={"w_ts": 0, "w_ss": 0}), step, logits, batch, None, None)
        plain.optimizer.zero_grad()
        loss["loss"].backward()
        plain.optimizer.step()

    def seminar_step(step: int) -> None:
        with torch.no_grad():  # the look-ahead teacher forward (of the next batch, in training)
            teacher_probs = seminar.teacher(batch["image_weak"]).softmax(1)
            CompactPrediction.from_probs(teacher_probs)
        pseudo, _ = fuse_pseudo_labels([peer_pred], cfg.method, n, batch["click_map"], batch["valid"])
        logits = seminar.model(batch["image_strong"][:, 0])
        loss = student_losses(cfg.method, step, logits, batch, teacher_probs, pseudo)
        seminar.optimizer.zero_grad()
        loss["loss"].backward()
        seminar.optimizer.step()
        seminar.teacher.update(seminar.net, step)

    times: dict[str, list[float]] = {"plain": [], "seminar": []}
    for step in range(args.steps + 2):
        for name, fn in (("plain", plain_step), ("seminar", seminar_step)):
            t0 = time.perf_counter()
            fn(step)
            if step >= 2:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - t0)

    p, s = statistics.median(times["plain"]), statistics.median(times["seminar"])
    print(f"{args.model} {h}x{w} batch {args.batch}, {args.threads} threads, median of {args.steps}")
    print(f"plain pCE step  {p * 1000:8.1f} ms")
    print(f"seminar step    {s * 1000:8.1f} ms")
    print(f"ratio           {s / p:8.2f}  (limit ~1.33)")


if __name__ == "__main__":
    main()
