"""Why is an EMA teacher worse than its student? Train one student, then evaluate its
teacher as trained, with the student's BatchNorm buffers, and with BatchNorm statistics
recalibrated on training images. Weights fine but statistics off shows as the last two
far above the first (docs/results.md, "EMA warm-up").

    .venv/bin/python scripts/ema_teacher_diagnosis.py deeplabv3plus_mobilenetv2 100 --set method.ema_warmup_steps=0
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile

import torch
from torch import nn

from seminar import checkpoint
from seminar.config import load_spec
from seminar.data import build_dataset
from seminar.data.transforms import SeminarViews
from seminar.engine import WorkerContext, evaluate, train_worker
from seminar.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", default="deeplabv3plus_mobilenetv2", nargs="?")
    p.add_argument("steps", type=int, default=100, nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    args = p.parse_args()
    cfg = load_spec(None, [f"students=[{{model: {args.model}, seed: 1, decoder_channels: 64}}]", "method.w_ss=0",
                           f"optim.steps={args.steps}", f"schedule.eval_every={args.steps}",
                           f"schedule.checkpoint_every={args.steps}", "schedule.log_every=20",
                           "resources.loader_workers=0", "data.synthetic.num_val=48", *args.overrides])
    saved = tempfile.mkdtemp(prefix="seminar-ema-")

    def report(metrics, directory):
        if directory:
            shutil.copytree(directory, saved, dirs_exist_ok=True)

    train_worker(cfg, WorkerContext(students=[0]), None, report)
    state = checkpoint.read_student(saved, 0)
    shutil.rmtree(saved)

    train_set, val_set = build_dataset(cfg.data, cfg.data.train_split), build_dataset(cfg.data, cfg.data.val_split)
    num_classes = train_set.info.num_classes

    def network(state_dict):
        net = build_model(args.model, num_classes, cfg.students[0].output_stride, None, 64)
        net.load_state_dict(state_dict)
        return net.eval()

    student, teacher = network(state["student"]), network(state["teacher"])
    with_student_bn = network({k: state["student"][k] if "running" in k or "num_batches" in k else v
                               for k, v in state["teacher"].items()})
    recalibrated = copy.deepcopy(teacher)
    for m in recalibrated.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=0)
    recalibrated.train()
    with torch.no_grad():
        for b in range(10):
            recalibrated(torch.stack([views(train_set[8 * b + i], 0, 8 * b + i, [], train=False)["image_weak"]
                                      for i in range(8)]))
    recalibrated.eval()

    matrices = evaluate({"student": student, "teacher": teacher, "teacher + student's BatchNorm buffers": with_student_bn,
                         "teacher, BatchNorm recalibrated": recalibrated}, val_set, views, num_classes,
                        WorkerContext(students=[]))
    print(f"{args.model}, {args.steps} steps, ema_warmup_steps={cfg.method.ema_warmup_steps}: val mIoU")
    for name, cm in matrices.items():
        print(f"  {name:<40} {cm.miou():.3f}")
    gaps = sorted(((float((state["teacher"][k] / state["student"][k]).log().abs().mean()), k)
                   for k in state["student"] if k.endswith("running_var")), reverse=True)
    print("largest mean |log(teacher / student running_var)|:", ", ".join(f"{k} {g:.2f}" for g, k in gaps[:3]))


if __name__ == "__main__":
    main()
