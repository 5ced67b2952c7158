"""Batching by pixels, not only by count: the way in (`model_input`), the batch, and each
image's share of it (`predict_batch`; `seminar.predict.restore_size` takes it to the image's size).

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

import torch
import torch.nn.functional as F

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
    """One forward over images of possibly different sizes -> each one's probabilities, cropped
    to the image's share of the padded batch (at the network's output resolution: [C, h_i/4, w_i/4]
    for the decoder's stride 4, rounded up)."""
    batch = pad_and_stack(tensors)
    probs = predict_probs(batch).float().cpu()
    stride = output_stride(batch.shape[-2:], probs.shape[-2:])
    return [p[:, : math.ceil(t.shape[-2] / stride), : math.ceil(t.shape[-1] / stride)] for p, t in zip(probs, tensors)]


def output_stride(input_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """A network's output stride, from its input and output sizes (output = ceil(input / stride))."""
    for stride in (1, 2, 4, 8, 16, 32):
        if all(math.ceil(i / stride) == o for i, o in zip(input_size, output_size)):
            return stride
    raise ValueError(f"an output of {tuple(output_size)} for an input of {tuple(input_size)}: no output stride fits")
