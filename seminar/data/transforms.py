"""From a Sample to the tensors one training step needs: its views.

Per sample: ONE geometric transform (random scale, pad-then-crop, horizontal flip) shared
by every view, drawn from `default_rng([seed, epoch, index])`, so that students in other
processes or on other machines cut exactly the same pixels for the same (epoch, index);
then a weak view (geometry only) for the teachers and one strong view per student
(photometric changes from `default_rng([seed, epoch, index, 1 + student])`).

Clicks move as coordinates and are drawn as disks only after the geometry, so a resize
never smears or drops a click. Pure torch and numpy (no torchvision): this runs in
DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seminar.config import AugmentConfig
from seminar.data.base import IGNORE_INDEX, MEAN, STD, Sample

_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane; cheaper than HSV.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float [3, H, W] with the ImageNet mean and std."""
    return _normalize_unit(_to_unit(image))


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays read through PIL are read-only; torch wants writable memory (copied only then).
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _to_unit(image: np.ndarray) -> torch.Tensor:
    # One pass into contiguous CHW floats: normalize() 0.7 ms instead of 2.5 ms at 512x384 here.
    pixels = _tensor(image).permute(2, 0, 1)
    return torch.empty(pixels.shape).copy_(pixels).div_(255.0)


def _normalize_unit(image: torch.Tensor) -> torch.Tensor:
    return (image - _MEAN) / _STD


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size..., 3], antialiased bilinear (torch's kernel on uint8:
    within 1 grey level of Pillow's on a VOC photo, ~5x faster here). Every image the model
    sees (datasets' load_scale, `seminar evaluate`, the endpoint) is resized by this."""
    if size == image.shape[:2]:
        return image
    pixels = _tensor(image).permute(2, 0, 1)
    resized = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return resized.permute(1, 2, 0).numpy()


def inference_size(height: int, width: int, scale: float, max_long_side: int) -> tuple[int, int]:
    """The size a model sees an image at: the scale it was trained at (`data.load_scale`), with
    the long side at most `max_long_side` (serving's `infer_size`, a bound on the work)."""
    scale = min(scale, max_long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def model_input(image: np.ndarray, scale: float, max_long_side: int) -> torch.Tensor:
    """An original uint8 [H, W, 3] RGB image -> the model's normalised float [3, h, w]:
    what validation, `seminar evaluate`, `seminar predict` and the endpoint all feed it."""
    return normalize(resize_image(image, inference_size(*image.shape[:2], scale, max_long_side)))


def rasterize_clicks(clicks: np.ndarray, height: int, width: int, radius: int) -> np.ndarray:
    """Draw clicks (x, y, cls) as disks of `radius` px on a 255-filled uint8 [H, W] canvas.

    A click whose nearest pixel lies outside the canvas is not drawn. Where disks of
    different classes overlap the later one wins, but every click's own pixel keeps its
    class (centres are drawn last).
    """
    canvas = np.full((height, width), IGNORE_INDEX, np.uint8)
    cols = np.floor(clicks[:, 0] + 0.5).astype(np.int64)
    rows = np.floor(clicks[:, 1] + 0.5).astype(np.int64)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    cols, rows, classes = cols[inside], rows[inside], clicks[inside, 2].astype(np.uint8)
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    in_disk = dx**2 + dy**2 <= radius**2
    dy, dx = dy[in_disk], dx[in_disk]
    for row, col, c in zip(rows, cols, classes):
        r, q = row + dy, col + dx
        keep = (r >= 0) & (r < height) & (q >= 0) & (q < width)
        canvas[r[keep], q[keep]] = c
    canvas[rows, cols] = classes
    return canvas


@dataclass(frozen=True)
class Geometry:
    """Resize the image to `size`, cut the crop at (top, left) (padding past the edge), flip."""

    size: tuple[int, int]  # (height, width) after scaling
    top: int
    left: int
    flip: bool


def draw_geometry(
    rng: np.random.Generator, height: int, width: int, crop: tuple[int, int], scale_range: tuple[float, float]
) -> Geometry:
    scale = rng.uniform(*scale_range)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    # The image sits at the top-left of a canvas padded to at least the crop size.
    top = int(rng.integers(0, max(size[0], crop[0]) - crop[0] + 1))
    left = int(rng.integers(0, max(size[1], crop[1]) - crop[1] + 1))
    return Geometry(size, top, left, flip=bool(rng.random() < 0.5))


def _cut(resized: torch.Tensor, geometry: Geometry, crop: tuple[int, int], fill: torch.Tensor | int) -> torch.Tensor:
    """The crop window of a [C, h, w] tensor; pixels past its edge take `fill`."""
    window = resized[:, geometry.top : geometry.top + crop[0], geometry.left : geometry.left + crop[1]]
    out = torch.empty((resized.shape[0], *crop), dtype=resized.dtype)
    out[:] = fill
    out[:, : window.shape[1], : window.shape[2]] = window
    return out.flip(-1) if geometry.flip else out


def transform_clicks(clicks: np.ndarray, height: int, width: int, geometry: Geometry, crop: tuple[int, int]) -> np.ndarray:
    """Move click coordinates through the geometry (pixel centres map to pixel centres)."""
    sy, sx = geometry.size[0] / height, geometry.size[1] / width
    moved = clicks.copy()
    moved[:, 0] = (clicks[:, 0] + 0.5) * sx - 0.5 - geometry.left
    moved[:, 1] = (clicks[:, 1] + 0.5) * sy - 0.5 - geometry.top
    if geometry.flip:
        moved[:, 0] = crop[1] - 1 - moved[:, 0]
    return moved


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    # Channels as a batch of one-channel images: ~3x faster on CPU than a grouped conv.
    x = F.pad(image[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x[:, 0]


def photometric(image: torch.Tensor, augment: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Colour jitter, hue shift, greyscale and blur of a float [3, H, W] image in [0, 1]."""
    # Every number is drawn whether or not it is used, so one switch does not shift the others.
    j = augment.color_jitter
    brightness, contrast, saturation = rng.uniform(1 - j, 1 + j, size=3)
    hue = rng.uniform(-augment.hue, augment.hue)
    grey = rng.random() < augment.grayscale_prob
    blur = rng.random() < augment.blur_prob
    sigma = rng.uniform(0.1, 2.0)

    x = image * brightness
    mean_luma = (x * _LUMA).sum(0).mean()
    x = (x - mean_luma) * contrast + mean_luma
    luma = (x * _LUMA).sum(0, keepdim=True)
    x = (x - luma) * saturation + luma
    if hue:
        angle = 2 * math.pi * hue
        rotate = torch.tensor(
            [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
        )
        x = torch.einsum("ij,jhw->ihw", _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ, x)
    x = x.clamp_(0, 1)
    if grey:
        x = (x * _LUMA).sum(0, keepdim=True).expand(3, -1, -1).contiguous()
    if blur:
        x = _gaussian_blur(x, sigma)
    return x


class SeminarViews:
    """Turns a Sample into aligned weak/strong views, a click map, the mask and a valid map."""

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        click_radius: int,
        augments: Sequence[AugmentConfig],
        seed: int = 0,
    ):
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.click_radius = click_radius
        self.augments = list(augments)
        self.seed = seed

    def __call__(
        self, sample: Sample, epoch: int, index: int, students: Sequence[int], train: bool = True
    ) -> dict[str, torch.Tensor]:
        height, width = sample.image.shape[:2]
        mask = sample.mask if sample.mask is not None else np.full((height, width), IGNORE_INDEX, np.uint8)
        if not train:
            return {
                "image_weak": normalize(sample.image),
                "click_map": _tensor(rasterize_clicks(sample.clicks, height, width, self.click_radius)).long(),
                "mask": _tensor(mask).long(),
                "valid": torch.ones((height, width), dtype=torch.bool),
            }

        crop = self.crop_size
        geometry = draw_geometry(np.random.default_rng([self.seed, epoch, index]), height, width, crop, self.scale_range)
        image = _to_unit(sample.image)[None]
        resized = F.interpolate(
            image, size=geometry.size, mode="bilinear", align_corners=False, antialias=geometry.size[0] < height
        )[0]
        resized_mask = F.interpolate(_tensor(mask)[None, None], size=geometry.size, mode="nearest-exact")[0]
        weak = _cut(resized, geometry, crop, fill=_MEAN)  # padding normalises to 0
        mask_crop = _cut(resized_mask, geometry, crop, fill=IGNORE_INDEX)[0]
        valid = _cut(torch.ones((1, *geometry.size), dtype=torch.bool), geometry, crop, fill=False)[0]
        clicks = transform_clicks(sample.clicks, height, width, geometry, crop)

        strong = []
        for student in students:
            rng = np.random.default_rng([self.seed, epoch, index, 1 + student])
            view = photometric(weak, self.augments[student], rng)
            strong.append(_normalize_unit(torch.where(valid, view, _MEAN)))
        return {
            "image_weak": _normalize_unit(weak),
            "image_rgb": weak,  # [0, 1] colours of the weak view, for the pairwise term
            "image_strong": torch.stack(strong) if strong else torch.empty((0, 3, *crop)),
            "click_map": _tensor(rasterize_clicks(clicks, crop[0], crop[1], self.click_radius)).long(),
            "mask": mask_crop.long(),
            "valid": valid,
        }
