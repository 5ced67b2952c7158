"""`seminar evaluate`: a checkpoint's per-class IoU and mIoU on a dataset, and a picture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .data import build_dataset
from .data.base import IGNORE_INDEX
from .metrics import ConfusionMatrix
from .predict import Segmenter


@dataclass
class Evaluation:
    matrix: ConfusionMatrix
    classes: list[str]
    dataset: str
    split: str
    click_source: str
    images: int


def evaluate_checkpoint(segmenter: Segmenter, data: DataConfig, split: str) -> Evaluation:
    dataset = build_dataset(data, split, clicks=False)
    if dataset.info.num_classes != len(segmenter.classes):
        raise ValueError(f"the model has {len(segmenter.classes)} classes, the {data.dataset} data "
                         f"{dataset.info.num_classes}")
    matrix = ConfusionMatrix(len(segmenter.classes))
    scored = 0
    for i in range(len(dataset)):
        # The original image and mask: scored is what the endpoint answers for this photo
        # (resized to the model's scale, predicted, brought back to the photo's size).
        sample = dataset.load(i)
        if sample.mask is None:
            continue  # no ground truth (e.g. a detection-only VOC image)
        label, _ = segmenter.segment(sample.image)
        matrix.update(torch.from_numpy(sample.mask.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
        scored += 1
    return Evaluation(matrix, segmenter.classes, data.dataset, split, dataset.info.click_source, scored)


def colorize(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    lut[IGNORE_INDEX] = (255, 255, 255)
    return lut[labels]


def image_miou(mask: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """One image's mIoU: the mean IoU over the classes in its ground truth or prediction."""
    matrix = ConfusionMatrix(num_classes)
    matrix.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
    return matrix.miou()


def save_grid(segmenter: Segmenter, data: DataConfig, split: str, path: str | Path, count: int) -> Path:
    """A PNG with a class legend on top and one row per sample: image | clicks | prediction
    (titled with that image's mIoU) | ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dataset = build_dataset(data, split, clicks=False)
    count = min(count, len(dataset))
    num_classes = len(segmenter.classes)
    rows = []
    for i in np.linspace(0, len(dataset) - 1, count).astype(int):
        sample = dataset.load(int(i))  # the original photo, as the endpoint would get it
        label, _ = segmenter.segment(sample.image)
        # its clicks as training drew them (at data.load_scale), back in original pixels
        clicks = dataset.at_scale(int(i), sample).clicks.copy()
        clicks[:, :2] = (clicks[:, :2] + 0.5) / data.load_scale - 0.5
        rows.append((sample, label, clicks))
    # white in a ground truth panel is IGNORE_INDEX or no mask at all (colorize): say so when
    # shown, or it reads as a class
    unlabelled = any(s.mask is None or (s.mask == IGNORE_INDEX).any() for s, _, _ in rows)
    swatches = [Patch(facecolor=np.array(colour) / 255.0, edgecolor="black", linewidth=0.5, label=name)
                for name, colour in zip(segmenter.classes, segmenter.palette)]
    if unlabelled:
        swatches.append(Patch(facecolor="white", edgecolor="black", linewidth=0.5, label="ignored / no label"))

    # Constrained layout gives the legend its own band above the rows (never over a panel)
    # and keeps each title clear of the row above; the figure grows by that band.
    legend_columns = min(len(swatches), 6)
    legend_height = 0.2 + 0.2 * -(-len(swatches) // legend_columns)
    fig, axes = plt.subplots(count, 4, figsize=(12, 3 * count + legend_height), squeeze=False, layout="constrained")
    for row, (sample, label, clicks) in enumerate(rows):
        prediction = "prediction"
        if sample.mask is not None:
            prediction += f", mIoU {image_miou(sample.mask, label, num_classes):.2f}"
        panels = [("image", sample.image), ("clicks", sample.image),
                  (prediction, colorize(label, segmenter.palette)),
                  ("ground truth", colorize(sample.mask, segmenter.palette) if sample.mask is not None
                   else np.full_like(sample.image, 255))]
        for col, (title, picture) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture)
            ax.set_axis_off()
            ax.set_title(f"{sample.image_id}: {title}" if col == 0 else title, fontsize=9)
        if len(clicks):
            colours = np.array(segmenter.palette)[clicks[:, 2].astype(int)] / 255.0
            axes[row, 1].scatter(clicks[:, 0], clicks[:, 1], c=colours, s=40, edgecolors="white")
    fig.legend(handles=swatches, loc="outside upper center", ncol=legend_columns, fontsize=9, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
