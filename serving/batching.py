"""Batching by pixels, not only by count: the way in (`model_input`), the batch, and the
way back to each image's own size (`restore_size`).

Every image is resized as the model takes it (`Segmenter.model_input`: its training scale,
the long side at most `infer_size`), normalised, and queued. Serve's `@serve.batch` forms batches; its
`batch_size_fn` prices a candidate batch with `PixelBudget.cost`, in *image slots*:

    cost = max(n, ceil(n * H_max * W_max * max_images / max_pixels))

where n images padded to the batch's largest height and width occupy n * H_max * W_max
pixels. Serve adds images while cost <= max_images (its `max_batch_size`), so a batch
holds at most `max_images` images AND at most `max_pixels` pixels after padding. (Pricing
in slots rather than raw pixels keeps Serve's own batch-size metrics meaningful.)

Images of one batch are padded at the bottom and right with zeros - in normalised space,
the ImageNet mean colour - and their probabilities cropped back before anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Upsample at most this many probability values at once when restoring a large image.
RESTORE_CHUNK_VALUES = 32 * 2**20


@dataclass(frozen=True)
class PixelBudget:
    max_images: int
    max_pixels: int

    def cost(self, images: list["QueuedImage"]) -> int:
        n = len(images)
        padded_pixels = n * max(i.height for i in images) * max(i.width for i in images)
        return max(n, math.ceil(padded_pixels * self.max_images / self.max_pixels))


@dataclass
class QueuedImage:
    """One image waiting for a batch: normalised [3, h, w] at inference size."""

    tensor: torch.Tensor
    budget: PixelBudget  # carried along because Serve's batch_size_fn sees only the items

    @property
    def height(self) -> int:
        return self.tensor.shape[-2]

    @property
    def width(self) -> int:
        return self.tensor.shape[-1]


def batch_cost(images: list[QueuedImage]) -> int:
    """`batch_size_fn` for `@serve.batch`."""
    return images[0].budget.cost(images)


def pad_and_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[3, h_i, w_i] -> [B, 3, H_max, W_max], zero padding at the bottom and right."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in tensors])


def predict_batch(predict_probs: Callable[[torch.Tensor], torch.Tensor],
                  tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One forward over images of possibly different sizes -> each one's [C, h_i, w_i] probabilities."""
    probs = predict_probs(pad_and_stack(tensors)).float().cpu()
    return [p[:, : t.shape[-2], : t.shape[-1]] for p, t in zip(probs, tensors)]


@torch.no_grad()
def restore_size(probs: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[C, h, w] probabilities -> (uint8 labels, float32 confidence), both [height, width].

    Probabilities are upsampled bilinearly and the argmax taken at full size (sharper
    boundaries than upsampling labels). A few classes at a time, with a running maximum,
    so a 16-megapixel answer never holds all C upsampled planes at once.
    """
    if probs.shape[-2:] == (height, width):
        confidence, labels = probs.max(0)
        return labels.to(torch.uint8).numpy(), confidence.numpy().astype(np.float32, copy=False)
    num_classes = probs.shape[0]
    chunk = max(1, RESTORE_CHUNK_VALUES // (height * width))
    best = labels = None
    for start in range(0, num_classes, chunk):
        part = F.interpolate(probs[None, start:start + chunk], size=(height, width), mode="bilinear",
                             align_corners=False)[0]
        part_best, part_labels = part.max(0)
        if best is None:
            best, labels = part_best, part_labels
        else:
            better = part_best > best  # ties keep the lower class id, as a full argmax would
            best = torch.where(better, part_best, best)
            labels = torch.where(better, part_labels + start, labels)
    return labels.to(torch.uint8).numpy(), best.numpy().astype(np.float32, copy=False)
