"""Seminar learning, the method (Chen et al., ICCV 2021): EMA teachers, pseudo-label fusion, losses.

For student k at step t:

    loss = loss_sup + w_ts·ramp(t)·loss_ts + w_ss·ramp(t − ss_start)·loss_ss [+ w_pair·ramp(t)·loss_pair]

- `loss_sup`: partial cross-entropy on clicked pixels (dense masks for full supervision),
              each (image, class) weighing the same or each pixel (`sup_norm`);
- `loss_ts`:  consistency between the student on its strong view and its own EMA teacher
              on the weak view, on unclicked valid pixels (`kl` or `mse`);
- `loss_ss`:  cross-entropy against the heterogeneous pseudo-label fused from the peers'
              predictions on unclicked pixels (thresholded at `tau` or per class), divided
              by all unclicked valid pixels, so a sparse pseudo-label gives a small loss;
- `loss_pair` (optional, `w_pair`): neighbouring pixels of nearly the same colour agree.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import MethodConfig
from .data.base import IGNORE_INDEX
from .exchange import CompactPrediction


def sigmoid_rampup(step: int, length: int) -> float:
    """Mean teacher's ramp-up exp(-5(1 - t/L)^2): 0 before t=0, 1 from t=L on."""
    if step < 0:
        return 0.0
    if length == 0 or step >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / length) ** 2)


class EmaTeacher(nn.Module):
    """An exponential moving average of a student's whole state dict: parameters and
    buffers (BatchNorm running statistics too), in the spirit of timm's ModelEmaV3: the
    teacher owns its decay and warm-up. Never trained, never wrapped in DDP."""

    def __init__(self, student: nn.Module, ema_decay: float, warmup_steps: int):
        super().__init__()
        self.module = copy.deepcopy(student).eval()
        self.module.requires_grad_(False)
        self.ema_decay, self.warmup_steps = ema_decay, warmup_steps

    def decay_at(self, step: int) -> float:
        # Warm-up measured in steps: the decay climbs linearly from 0 to ema_decay at
        # `warmup_steps`, so early teachers follow their fast-moving students (averaged
        # BatchNorm statistics of the first steps broke a from-scratch teacher) and any run
        # longer than the warm-up has the teacher `ema_decay` asks for. (The power warm-up
        # 1-(1+t)^-2/3 kept every decay above 0.99 inert for 1,000 steps.)
        if step >= self.warmup_steps:
            return self.ema_decay
        return self.ema_decay * step / self.warmup_steps

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        for t, s in zip(self.module.state_dict().values(), student.state_dict().values()):
            if t.dtype.is_floating_point:
                t.lerp_(s.detach(), 1.0 - decay)
            else:  # integer buffers such as BatchNorm's num_batches_tracked
                t.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def class_thresholds(label: torch.Tensor, confidence: torch.Tensor, region: torch.Tensor, num_classes: int,
                     keep_fraction: float) -> torch.Tensor:
    """Per predicted class, the confidence above which its most confident `keep_fraction` of
    the pixels in `region` lie: float [num_classes] (1.0 for classes not predicted there).
    Rare and hard classes keep some pseudo-labels although they never reach a fixed tau."""
    thresholds = torch.ones(num_classes)
    label, confidence = label[region], confidence[region].float()
    for c in label.unique().tolist():
        thresholds[c] = torch.quantile(confidence[label == c], 1.0 - keep_fraction)
    return thresholds


def fuse_pseudo_labels(peers: list[CompactPrediction], cfg: MethodConfig, num_classes: int,
                       click_map: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The heterogeneous pseudo-label of one student from its peers' predictions.

    A confidence-weighted vote: each peer adds its confidence to the class it predicts;
    the fused confidence is the winning class's total divided by the number of peers (so
    disagreement lowers it). Only unclicked valid pixels get one (clicks stay in
    `loss_sup`), and only where the fused confidence reaches `tau`, or, with
    `ss_class_fraction`, where it is among its class's most confident fraction. Returns
    (pseudo_label int64 [B,H,W], 255 elsewhere; fused_confidence float [B,H,W]).
    """
    device = click_map.device
    label0 = torch.from_numpy(peers[0].label)
    score = torch.zeros((label0.shape[0], num_classes, *label0.shape[1:]), dtype=torch.float32)
    for p in peers:
        label = torch.from_numpy(p.label).long().unsqueeze(1)
        conf = torch.from_numpy(p.confidence).float().unsqueeze(1) / 255.0
        score.scatter_add_(1, label, conf)
    fused_conf, fused_label = (score / len(peers)).max(dim=1)
    fused_conf, fused_label = fused_conf.to(device), fused_label.to(device)
    region = (click_map == IGNORE_INDEX) & valid
    threshold = torch.full_like(fused_conf, cfg.tau)
    if cfg.ss_class_fraction > 0 and region.any():
        per_class = class_thresholds(fused_label.cpu(), fused_conf.cpu(), region.cpu(), num_classes,
                                     cfg.ss_class_fraction).to(device)
        threshold = torch.minimum(threshold, per_class[fused_label])
    pseudo = torch.where((fused_conf >= threshold) & region, fused_label, IGNORE_INDEX)
    return pseudo, fused_conf


@dataclass(frozen=True)
class CutMix:
    """Boxes pasted between the images of a batch: image i takes `partner[i]`'s pixels inside
    `box[i]`. Called on the student's input and on every target alike, so each pixel's target
    comes from the image its pixel came from."""

    box: torch.Tensor  # bool [B, H, W]
    partner: torch.Tensor  # int64 [B]

    def __call__(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        box = self.box.to(x.device).view(x.shape[0], *[1] * (x.dim() - 3), *self.box.shape[1:])
        return torch.where(box, x[self.partner.to(x.device)], x)


def cutmix_boxes(rng: np.random.Generator, count: int, height: int, width: int, prob: float) -> np.ndarray:
    """`count` CutMix boxes as bool [count, H, W] masks, UniMatch's: with probability `prob` a
    box of 2-40% of the image's area and aspect ratio 0.3-3.3 at a uniform place, else none.
    Every number is drawn for every image, so one image's outcome does not shift the others'."""
    boxes = np.zeros((count, height, width), bool)
    for i in range(count):
        use, area, ratio, top, left = rng.random(), rng.uniform(0.02, 0.4), rng.uniform(0.3, 1 / 0.3), rng.random(), rng.random()
        if use >= prob:
            continue
        h = min(height, max(1, round(math.sqrt(area * height * width * ratio))))
        w = min(width, max(1, round(math.sqrt(area * height * width / ratio))))
        y, x = int(top * (height - h + 1)), int(left * (width - w + 1))
        boxes[i, y:y + h, x:x + w] = True
    return boxes


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor, per_image_class: bool = False) -> torch.Tensor:
    """Cross-entropy over the labelled pixels only; 0 (with a graph) when there are none.

    `per_image_class`: every (image, class) with labelled pixels weighs the same, however
    many pixels it has (one small click of a thin pole must not be outvoted by the many
    disks of a broken-up fence, nor a whole road by nothing)."""
    labelled = target != IGNORE_INDEX
    if not labelled.any():
        return logits.sum() * 0.0
    if not per_image_class:
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")[labelled]
    image = torch.arange(target.shape[0], device=target.device).view(-1, 1, 1).expand_as(target)[labelled]
    group = image * logits.shape[1] + target[labelled]
    sums = torch.zeros(target.shape[0] * logits.shape[1], device=logits.device).index_add_(0, group, per_pixel)
    counts = torch.bincount(group, minlength=sums.numel())
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def consistency_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, pixels: torch.Tensor,
                     kind: str) -> torch.Tensor:
    """Pixel consistency with the teacher on the pixels in `pixels` (bool [B,H,W])."""
    if not pixels.any():
        return student_logits.sum() * 0.0
    if kind == "mse":
        per_pixel = (student_logits.softmax(1) - teacher_probs).pow(2).mean(1)
    else:  # kl(teacher || student)
        per_pixel = (teacher_probs * (teacher_probs.clamp_min(1e-8).log() - student_logits.log_softmax(1))).sum(1)
    return per_pixel[pixels].mean()


def pseudo_label_loss(logits: torch.Tensor, pseudo_label: torch.Tensor, region: torch.Tensor,
                      per_image_class: bool = False) -> torch.Tensor:
    """Cross-entropy against the pseudo-label, summed over its pixels and divided by all the
    unclicked valid pixels (`region`): a pseudo-label covering 2% of them gives ~2% of the loss
    a full one would, instead of the weight of a dense label.

    `per_image_class`: the mean over (image, class) groups, as `loss_sup` weighs clicks, times
    the coverage: confident pixels are mostly sky and road, and per pixel they would outvote
    the small classes that the clicks' normalisation protects."""
    if per_image_class:
        coverage = (pseudo_label != IGNORE_INDEX).sum() / region.sum().clamp(min=1)
        return partial_cross_entropy(logits, pseudo_label, per_image_class=True) * coverage
    per_pixel = F.cross_entropy(logits, pseudo_label, ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.sum() / region.sum().clamp(min=1)


# The 8 neighbours at distance 2 that the pairwise term compares each pixel with (BoxInst's).
_PAIR_OFFSETS = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)]


def pairwise_affinity_loss(logits: torch.Tensor, image_rgb: torch.Tensor, valid: torch.Tensor,
                           color_tol: float) -> torch.Tensor:
    """Label-free: neighbouring pixels of nearly the same colour should get the same class.

    For each pixel and its 8 neighbours at distance 2 whose RGB colours (in [0, 1]) differ by
    at most `color_tol` (Euclidean), -log of the probability that both take the same class,
    sum_c p_i(c) p_j(c), averaged over those pairs (BoxInst's pairwise term, RGB instead of
    Lab). It spreads each click's label across its uniform region and stops at colour edges.
    """
    probs = logits.softmax(1)
    height, width = logits.shape[-2:]
    total, count = logits.new_zeros(()), 0
    for dy, dx in _PAIR_OFFSETS:
        # pixel (y, x) against (y + dy, x + dx), both inside the crop
        ys, yd = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
        xs, xd = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
        similar = (image_rgb[:, :, ys, xs] - image_rgb[:, :, yd, xd]).norm(dim=1) <= color_tol
        similar &= valid[:, ys, xs] & valid[:, yd, xd]
        if similar.any():
            same = (probs[:, :, ys, xs] * probs[:, :, yd, xd]).sum(1)
            total = total - same[similar].clamp_min(1e-6).log().sum()
            count += int(similar.sum())
    return total / max(count, 1)


def student_losses(cfg: MethodConfig, step: int, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                   teacher_probs: torch.Tensor | None, pseudo_label: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """All losses of one student for one step; `loss` is the weighted total to minimise."""
    click_map, valid = batch["click_map"], batch["valid"]
    unclicked = (click_map == IGNORE_INDEX) & valid
    target = click_map
    if cfg.supervision == "dense":  # the masks of the clicked images (an unclicked image's is not a label)
        labelled = batch.get("labelled", torch.ones(len(click_map), dtype=torch.bool)).to(click_map.device)
        target = torch.where(labelled.view(-1, 1, 1), batch["mask"], IGNORE_INDEX)
    loss_sup = partial_cross_entropy(logits, target, per_image_class=cfg.sup_norm == "image_class")
    zero = logits.new_zeros(())

    loss_ts = zero
    if cfg.w_ts > 0 and teacher_probs is not None:
        loss_ts = consistency_loss(logits, teacher_probs, unclicked, cfg.ts_loss)

    loss_ss = zero
    if cfg.w_ss > 0 and pseudo_label is not None:
        loss_ss = pseudo_label_loss(logits, pseudo_label, unclicked, per_image_class=cfg.ss_norm == "image_class")

    loss_pair = zero
    if cfg.w_pair > 0:
        loss_pair = pairwise_affinity_loss(logits, batch["image_rgb"], valid, cfg.pair_color_tol)

    ramp_ts = sigmoid_rampup(step, cfg.rampup_steps)
    ramp_ss = sigmoid_rampup(step - cfg.ss_start, cfg.rampup_steps)
    loss = (loss_sup + cfg.w_ts * ramp_ts * loss_ts + cfg.w_ss * ramp_ss * loss_ss
            + cfg.w_pair * ramp_ts * loss_pair)
    return {"loss": loss, "loss_sup": loss_sup, "loss_ts": loss_ts, "loss_ss": loss_ss, "loss_pair": loss_pair}
