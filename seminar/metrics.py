"""Confusion-matrix mIoU: the one evaluation every report uses."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .data.base import IGNORE_INDEX

# The names in a flat report (metrics.jsonl, Ray Train's report, Tune's results; Prometheus
# labels are made from them in cluster/train_metrics.py): a student's metric is "s<k>/<name>",
# spelt here only.
LOSS_TERMS = ("loss_sup", "loss_ts", "loss_ss")  # what progress lines and run summaries show
LOSSES = ("loss", *LOSS_TERMS, "loss_pair")  # every loss a step reports (seminar.method.student_losses)
PSEUDO_LABEL_METRICS = ("pseudo_frac", "diag_pseudo_acc", "diag_student_acc")  # on unclicked pixels
ENSEMBLE_MIOU = "val_miou_teacher_ensemble"
SERVED_MIOU = "val/miou"  # the served network's (method.inference), copied from its own key
SERVED_IOU = "val/iou/"  # + class id: the served network's per-class IoU


def student_key(k: int, name: str) -> str:
    """Student k's metric `name` in a flat report."""
    return f"s{k}/{name}"


def val_miou_key(k: int, who: str) -> str:
    """Student k's (`who` = student) or its teacher's (`who` = teacher) val mIoU."""
    return student_key(k, f"val_miou_{who}")


class ConfusionMatrix:
    """Rows = ground truth, columns = prediction; ignore-labelled pixels are left out."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        keep = target != IGNORE_INDEX
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        self.matrix += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes)

    def all_reduce(self, group) -> None:
        """Sum over the workers of `group`, which evaluated disjoint shards of one dataset."""
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(self.matrix, group=group)

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        iou = self.iou()
        return float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum() / total) if total else 0.0
