"""Seminar learning, the method (DESIGN §1): EMA teachers, pseudo-label fusion, losses.

For student k at step t:

    loss = loss_sup + w_ts·ramp(t)·loss_ts + w_ss·ramp(t − ss_start)·loss_ss

- `loss_sup`: partial cross-entropy on clicked pixels (dense masks for full supervision);
- `loss_ts`:  consistency between the student on its strong view and its own EMA teacher
              on the weak view, on unclicked valid pixels (`mse` or `kl`);
- `loss_ss`:  cross-entropy against the heterogeneous pseudo-label fused from the peers'
              predictions (thresholded at `tau`, clicked pixels overwritten).
"""

from __future__ import annotations

import copy
import math

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
    buffers (BatchNorm running statistics too), in the spirit of timm's ModelEmaV3.
    Never trained, never wrapped in DDP."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student).eval()
        self.module.requires_grad_(False)

    @staticmethod
    def decay_at(step: int, ema_decay: float, warmup_power: float) -> float:
        # Warm-up: early teachers follow the student closely instead of averaging noise.
        # With power 1 (mean teacher's) the teacher is the uniform average of every step
        # so far, random init included, until the decay reaches ema_decay; from scratch,
        # averaged BatchNorm statistics from those first steps broke a MobileNetV2 teacher
        # (docs/results.md). timm's 2/3 lets them fade sooner.
        return min(ema_decay, 1.0 - (1.0 + step) ** -warmup_power)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, ema_decay: float, warmup_power: float) -> None:
        decay = self.decay_at(step, ema_decay, warmup_power)
        for t, s in zip(self.module.state_dict().values(), student.state_dict().values()):
            if t.dtype.is_floating_point:
                t.lerp_(s.detach(), 1.0 - decay)
            else:  # integer buffers such as BatchNorm's num_batches_tracked
                t.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def fuse_pseudo_labels(peers: list[CompactPrediction], num_classes: int, tau: float,
                       click_map: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The heterogeneous pseudo-label of one student from its peers' predictions.

    A confidence-weighted vote: each peer adds its confidence to the class it predicts;
    the fused confidence is the winning class's total divided by the number of peers (so
    disagreement lowers it). Pixels below `tau` or outside the image are ignored, and
    clicked pixels take their click class. Returns (pseudo_label int64 [B,H,W],
    fused_confidence float [B,H,W]).
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
    pseudo = torch.where((fused_conf >= tau) & valid, fused_label, IGNORE_INDEX)
    pseudo = torch.where(click_map != IGNORE_INDEX, click_map, pseudo)
    return pseudo, fused_conf


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled pixels only; 0 (with a graph) when there are none."""
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


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


def student_losses(cfg: MethodConfig, step: int, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                   teacher_probs: torch.Tensor | None, pseudo_label: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """All losses of one student for one step; `loss` is the weighted total to minimise."""
    click_map, valid = batch["click_map"], batch["valid"]
    target = batch["mask"] if cfg.supervision == "dense" else click_map
    loss_sup = partial_cross_entropy(logits, target)
    zero = logits.new_zeros(())

    loss_ts = zero
    if cfg.w_ts > 0 and teacher_probs is not None:
        loss_ts = consistency_loss(logits, teacher_probs, (click_map == IGNORE_INDEX) & valid, cfg.ts_loss)

    loss_ss = zero
    if cfg.w_ss > 0 and pseudo_label is not None:
        loss_ss = partial_cross_entropy(logits, pseudo_label)

    ramp_ts = sigmoid_rampup(step, cfg.rampup_steps)
    ramp_ss = sigmoid_rampup(step - cfg.ss_start, cfg.rampup_steps)
    loss = loss_sup + cfg.w_ts * ramp_ts * loss_ts + cfg.w_ss * ramp_ss * loss_ss
    return {"loss": loss, "loss_sup": loss_sup, "loss_ts": loss_ts, "loss_ss": loss_ss}
