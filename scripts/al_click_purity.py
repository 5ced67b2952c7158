"""Click purity of the active-learning arms (docs/results.md) as training draws them: each click
a disk of data.click_radius at data.load_scale; the share of its labelled pixels that are of
the click's class.

    .venv/bin/python scripts/al_click_purity.py random least_confident suggested disagreement_max
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq

from seminar.config import load_spec
from seminar.data import build_dataset
from seminar.data.base import IGNORE_INDEX
from seminar.data.datasets import rescale


def main() -> None:
    cfg = load_spec("jobs/configs/camvid.yaml").data
    dataset = build_dataset(cfg, "train")
    index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    r = cfg.click_radius
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = dy**2 + dx**2 <= r * r
    masks: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
    for arm in sys.argv[1:]:
        same = total = 0
        rows = pq.read_table(f"runs/camvid/al/{arm}.parquet").to_pylist()
        for row in rows:
            i = index[row["image_id"]]
            if i not in masks:
                original = dataset.load(i)
                masks[i] = rescale(original, cfg.load_scale).mask, original.mask.shape
            mask, (height, width) = masks[i]
            h, w = mask.shape
            # original pixels -> training pixels, centre to centre, as rescale() moves clicks
            cy = int(round(np.clip((row["y"] + 0.5) * h / height - 0.5, 0, h - 1)))
            cx = int(round(np.clip((row["x"] + 0.5) * w / width - 0.5, 0, w - 1)))
            ys, xs = (cy + dy)[disk], (cx + dx)[disk]
            inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            labels = mask[ys[inside], xs[inside]]
            labels = labels[labels != IGNORE_INDEX]
            same += int((labels == row["cls"]).sum())
            total += labels.size
        print(f"{arm}: {len(rows)} clicks, purity {same / total:.1%} of {total} disk pixels")


if __name__ == "__main__":
    main()
