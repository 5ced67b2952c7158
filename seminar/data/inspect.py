"""What is in a click file: images, clicks per class, empty lists, clicks off the image,
and, where masks exist, click purity (the share of click-disk pixels on their own class).

Negative coordinates are always caught; clicks past the right or bottom edge only where
the image size is known, from a folder of masks or images (`masks_dir`, `images_dir`),
and the report says how many images were size-checked that way.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seminar.data.base import IGNORE_INDEX
from seminar.data.clicks import click_sources, clicks_by_image, empty_image_ids, load_clicks
from seminar.data.datasets import IMAGE_SUFFIXES, VOC_CLASSES, image_size, read_index_png
from seminar.data.files import local_file
from seminar.data.transforms import rasterize_clicks

_VOC_ID = re.compile(r"^\d{4}_\d{6}$")


@dataclass
class ClickPurity:
    """Share of click-disk pixels (clicks drawn as training draws them) on their own class,
    where a mask says; void / ignore pixels count as off-class."""

    radius: int
    on_class: dict[int, int] = field(default_factory=dict)  # class -> disk pixels on that class
    drawn: dict[int, int] = field(default_factory=dict)  # class -> disk pixels drawn
    images: int = 0

    def add(self, clicks: np.ndarray, mask: np.ndarray) -> None:
        self.add_disks(rasterize_clicks(clicks, *mask.shape, self.radius), mask)

    def add_disks(self, disks: np.ndarray, mask: np.ndarray) -> None:
        """One image's click disks already drawn (a click map: class or IGNORE_INDEX per pixel)."""
        for c in np.unique(disks[disks != IGNORE_INDEX]).tolist():
            pixels = disks == c
            self.drawn[c] = self.drawn.get(c, 0) + int(pixels.sum())
            self.on_class[c] = self.on_class.get(c, 0) + int((mask[pixels] == c).sum())
        self.images += 1

    @property
    def overall(self) -> float:
        return sum(self.on_class.values()) / max(sum(self.drawn.values()), 1)

    def per_class(self) -> dict[int, float]:
        return {c: self.on_class[c] / self.drawn[c] for c in sorted(self.drawn)}


@dataclass
class ClickReport:
    path: str
    sources: list[str]
    num_images: int  # including images listed with no clicks
    num_clicks: int
    rank1_clicks: int
    empty_images: list[str]
    clicks_per_class: dict[int, int]
    class_names: dict[int, str] | None  # VOC names when the file looks like VOC
    negative_clicks: int  # x < 0 or y < 0
    beyond_image_clicks: int  # x > W-1 or y > H-1, among size-checked images
    size_checked_images: int
    duplicate_clicks: int  # same image, class and position as an earlier click (each counted once more)
    clipped_on_load: int  # out by at most 1 px: datasets clip these onto the image
    dropped_on_load: int  # further out: datasets drop these
    out_of_image_examples: list[tuple[str, float, float]] = field(default_factory=list)
    purity: ClickPurity | None = None  # with masks
    seconds: float = 0.0


def _files_by_stem(folder: str | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if folder is None:
        return {}
    return {p.stem: p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes}


def inspect_clicks(path: str, masks_dir: str | None = None, images_dir: str | None = None,
                   radius: int = 3) -> ClickReport:
    start = time.perf_counter()
    table = load_clicks(path)
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    classes = table["cls"].to_numpy()
    unique_ids, row_image = np.unique(ids, return_inverse=True)
    empty = empty_image_ids(table)

    # Image sizes where a mask or image file gives them (headers only, no decoding).
    sized = {**_files_by_stem(images_dir, IMAGE_SUFFIXES), **_files_by_stem(masks_dir, (".png",))}
    heights = np.full(len(unique_ids), np.inf)
    widths = np.full(len(unique_ids), np.inf)
    checked = 0
    for k, image_id in enumerate(unique_ids):
        if image_id in sized:
            heights[k], widths[k] = image_size(local_file(sized[image_id]))
            checked += 1
    h, w = heights[row_image], widths[row_image]
    negative = (x < 0) | (y < 0)
    beyond = (x > w - 1) | (y > h - 1)
    outside = negative | beyond
    near = (x >= -1) & (y >= -1) & (x <= w) & (y <= h)

    purity = None
    if masks_dir is not None:  # click purity at the original resolution, disks of `radius`
        masks = _files_by_stem(masks_dir, (".png",))
        purity = ClickPurity(radius)
        by_image = clicks_by_image(table)
        for image_id in unique_ids:
            if image_id in masks:
                purity.add(by_image[image_id], read_index_png(local_file(masks[image_id])))

    per_class = dict(zip(*(v.tolist() for v in np.unique(classes, return_counts=True))))
    looks_like_voc = all(1 <= c < len(VOC_CLASSES) for c in per_class) and all(
        _VOC_ID.match(i) for i in [*unique_ids[:100], *empty[:100]]
    )
    return ClickReport(
        path=str(path),
        sources=click_sources(table),
        num_images=len(unique_ids) + len(empty),
        num_clicks=table.num_rows,
        rank1_clicks=int(np.sum(table["rank"].to_numpy() == 1)),
        empty_images=empty,
        clicks_per_class=per_class,
        class_names={c: VOC_CLASSES[c] for c in per_class} if looks_like_voc else None,
        negative_clicks=int(negative.sum()),
        beyond_image_clicks=int(beyond.sum()),
        size_checked_images=checked,
        duplicate_clicks=table.num_rows - len(set(zip(ids.tolist(), x.tolist(), y.tolist(), classes.tolist()))),
        clipped_on_load=int(np.sum(outside & near)),
        dropped_on_load=int(np.sum(outside & ~near)),
        out_of_image_examples=[(str(ids[r]), float(x[r]), float(y[r])) for r in np.flatnonzero(outside)[:5]],
        purity=purity,
        seconds=time.perf_counter() - start,
    )
