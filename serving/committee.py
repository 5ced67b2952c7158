"""Where to click next: the students' teachers as a committee.

Every student's EMA teacher (a checkpoint holds them all) segments the image; where they
disagree is where a click teaches most. Per pixel the disagreement is the Jensen-Shannon
divergence of the teachers' class probabilities (the mutual information between a teacher's
vote and the class), divided by its ceiling log K: 0 where they agree, 1 where each is sure
of a different class. The image's score is its mean; the suggested clicks are the most
interior points of the largest disagreeing regions (pixels above `DISAGREE_LEVEL`), ranked
by their summed disagreement. A one-student model, or an exported graph (one network), has
no committee: no disagreement, no suggestions.

Used by `seminar predict` (serving.predict_folder) and by the endpoint when
`serving.suggest_clicks` > 0 (it then runs every teacher: with `teacher_ensemble` served that
costs nothing extra, the ensemble being their mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from seminar.predict import Segmenter
from serving.batching import predict_batch

DISAGREE_LEVEL = 0.2  # a pixel disagrees above this share of the divergence ceiling
MIN_REGION = 16  # pixels (at inference size): smaller disagreeing specks get no suggestion


def disagreement_map(member_probs: list[torch.Tensor]) -> torch.Tensor:
    """K teachers' [C, H, W] probabilities -> [H, W] Jensen-Shannon divergence / log K, in [0, 1]."""
    stack = torch.stack(member_probs).clamp_min(1e-8)
    mean = stack.mean(0)
    entropy_of_mean = -(mean * mean.log()).sum(0)
    mean_entropy = -(stack * stack.log()).sum(1).mean(0)
    return ((entropy_of_mean - mean_entropy) / math.log(len(member_probs))).clamp(0, 1)


def suggest_clicks(disagreement: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """(x, y, score) at the most interior pixel (nearest the centre among them) of each of the `count` disagreeing regions
    with the largest summed disagreement."""
    if count <= 0:
        return []
    regions, n = ndimage.label(disagreement > DISAGREE_LEVEL)
    if n == 0:
        return []
    sums = ndimage.sum_labels(disagreement, regions, index=np.arange(1, n + 1))
    areas = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    ranked = [r for r in np.argsort(-sums) if areas[r] >= MIN_REGION][:count]
    clicks = []
    for r in ranked:
        distance = ndimage.distance_transform_edt(np.pad(regions == r + 1, 1))[1:-1, 1:-1]
        # the deepest pixels form a ridge in elongated regions: take the one nearest the centre
        ys, xs = np.nonzero(distance >= distance.max() - 0.5)
        cy, cx = ndimage.center_of_mass(regions == r + 1)
        nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        clicks.append((int(xs[nearest]), int(ys[nearest]), float(sums[r])))
    return clicks


@dataclass
class Committee:
    """The served network and, for models with several students, each student's teacher."""

    served: Segmenter
    members: list[Segmenter]

    @classmethod
    def load(cls, uri: str, which: str | None, runtime: str, threads: int | None, device: str = "cpu") -> "Committee":
        served = Segmenter.load(uri, which, device, runtime, threads)
        if uri.endswith(".onnx"):
            return cls(served, [])  # an exported graph holds one network
        num_students = len(served.meta["spec"]["students"])
        if num_students == 1:
            return cls(served, [])
        # the served teacher is one of them: loaded (and exported) once
        members = [served if served.which == f"teacher_{k}" else
                   Segmenter.load(uri, f"teacher_{k}", device, runtime, threads) for k in range(num_students)]
        return cls(served, members)

    def __call__(self, tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per image: (the served network's probabilities, at the networks' output resolution as
        without a committee; the disagreement map at the input size, or None)."""
        members = [predict_batch(m.predict_probs, tensors) for m in self.members]
        by_member = {m.which: probs for m, probs in zip(self.members, members)}
        if self.served.which in by_member:  # no second forward for a network already run
            served = by_member[self.served.which]
        elif self.served.which == "teacher_ensemble" and members:
            served = [torch.stack(per_image).mean(0) for per_image in zip(*members)]
        else:
            served = predict_batch(self.served.predict_probs, tensors)
        if not members:
            return [(p, None) for p in served]
        # at the input size (the networks answer at a quarter of it): suggestions and the
        # disagreement's regions are placed and sized in its pixels
        maps = [disagreement_map([F.interpolate(p[None], size=t.shape[-2:], mode="bilinear", align_corners=False)[0]
                                  for p in per_image]) for per_image, t in zip(zip(*members), tensors)]
        return list(zip(served, maps))


def in_image_pixels(points: list[tuple[int, int, float]], map_shape: tuple[int, int], width: int,
                    height: int) -> list[dict]:
    """(x, y, score) on a map at inference size -> {x, y, score} in the original image's pixels."""
    sx, sy = width / map_shape[1], height / map_shape[0]
    return [{"x": min(width - 1, int((x + 0.5) * sx)), "y": min(height - 1, int((y + 0.5) * sy)), "score": score}
            for x, y, score in points]


def suggested_clicks(disagreement: np.ndarray, count: int, width: int, height: int) -> list[dict]:
    """suggest_clicks on a map at inference size, in the original image's pixels."""
    return in_image_pixels(suggest_clicks(disagreement, count), disagreement.shape, width, height)
