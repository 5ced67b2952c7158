"""Where to click next, tested: N more clicks per CamVid training image, seven ways.

From a trained model with two or more students, for every training image:
  suggested      the committee's suggestions (`serving.committee`: the most interior points of
                 the regions where the students' teachers disagree most), what `seminar predict`
                 and the endpoint offer;
  disagreement_max the N pixels where the teachers disagree most, SPACING apart (the same
                 signal as suggested, placed at its peaks instead of inside its regions);
  least_confident the N pixels where the served network's top class probability is lowest,
                 at least SPACING pixels (at inference size) apart;
  random         N pixels drawn uniformly;
  segments       the most interior pixels of the predicted segments (connected regions of one
                 class in the served label map) of highest mean disagreement, one per class
                 first (session 9: a try at beating random);
  weighted       N pixels drawn at random with probability proportional to the disagreement
                 (plus a floor), off predicted class boundaries (session 9: random's spread,
                 leaning towards doubt);
  balanced       drawn as weighted, but each class of the served label map gets an equal share
                 of the draw (times its mean doubt) instead of a share by its area (session 11:
                 random's clicks go where the area is - Road, Sky, Building - while the
                 per-class mean IoU is lost on the thin, rare classes).
A simulated annotator labels each point with the ground-truth class under it; a point on
void (CamVid's unlabelled pixels) gets no label and is counted as spent. Each arm is written
as a click table (`OUT/ARM.parquet`, source `user`) for `data.extra_clicks`; a summary (clicks
spent, kept, kept where the served network was wrong, per class) goes to `OUT/summary.json`.
The retraining is scripts/active_learning_study.sh.

    .venv/bin/python scripts/active_learning_clicks.py runs/camvid/study-pce2_1pc-s0 \
        --config jobs/configs/camvid.yaml --clicks 4 --out runs/camvid/al
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from seminar.config import load_spec
from seminar.data import build_dataset, make_click_table, write_click_table
from seminar.data.base import IGNORE_INDEX
from seminar.predict import restore_size
from serving.committee import MIN_REGION, Committee, in_image_pixels, suggested_clicks

ARMS = ("suggested", "disagreement_max", "least_confident", "random", "segments", "weighted", "balanced")
INTERIOR = 3  # pixels at inference size a weighted pick keeps from a predicted class boundary
WEIGHT_FLOOR = 0.05  # added to the disagreement: agreed-on pixels keep some chance
SPACING = 8  # pixels at inference size between two points of the pixel-wise arms (their extremes clump)


def lowest_points(score: torch.Tensor, count: int) -> list[tuple[int, int, float]]:
    """(x, y, score) of the `count` pixels of lowest score ([h, w] at inference size), SPACING apart."""
    score = score.clone()
    h, w = score.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    points = []
    for _ in range(count):
        y, x = divmod(int(score.argmin()), w)
        points.append((x, y, float(score[y, x])))
        score[(ys - y) ** 2 + (xs - x) ** 2 < SPACING**2] = float("inf")
    return points


def suggest_segment_clicks(labels: np.ndarray, disagreement: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """(x, y, score) at the most interior pixel of each of the `count` predicted segments (connected
    regions of one class in the label map, at inference size) whose mean disagreement is highest,
    one per class while other classes remain: a point deep inside a segment should be labelled
    cleanly by one click, and the segments the teachers doubt are the ones most likely wrong."""
    segments = []  # (mean disagreement, class, the class's labelled regions, the segment's label)
    for cls in np.unique(labels):
        regions, n = ndimage.label(labels == cls)
        means = ndimage.mean(disagreement, regions, index=np.arange(1, n + 1))
        areas = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        segments += [(float(means[r]), int(cls), regions, r + 1) for r in range(n) if areas[r] >= MIN_REGION]
    segments.sort(key=lambda s: -s[0])
    firsts, rest, seen = [], [], set()  # each class's best segment first, then the others, by score
    for segment in segments:
        (rest if segment[1] in seen else firsts).append(segment)
        seen.add(segment[1])
    clicks = []
    for score, _, regions, label in (firsts + rest)[:count]:
        distance = ndimage.distance_transform_edt(np.pad(regions == label, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(distance.argmax()), distance.shape)
        clicks.append((int(x), int(y), score))
    return clicks


def weighted_points(labels: np.ndarray, disagreement: np.ndarray, count: int, rng: np.random.Generator,
                    balance_classes: bool = False) -> list[tuple[int, int, float]]:
    """`count` distinct pixels drawn at random with probability proportional to the disagreement
    (plus WEIGHT_FLOOR), among those at least INTERIOR pixels from a predicted boundary: random's
    spread over the image, leaning towards where the teachers doubt, off the edges where a click's
    disk would cover two classes. With `balance_classes` each pixel's weight is divided by its
    predicted class's area in the image, so that every class gets the same share of the draw."""
    edges = np.zeros(labels.shape, bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    interior = ndimage.distance_transform_edt(~edges) >= INTERIOR
    weights = (disagreement + WEIGHT_FLOOR) * interior
    if balance_classes:
        area = np.bincount(labels.ravel(), weights=interior.ravel())
        weights = weights / np.maximum(area, 1)[labels]
    weights = weights.ravel()
    if weights.sum() == 0:
        weights = np.ones_like(weights)
    picks = rng.choice(weights.size, size=min(count, int((weights > 0).sum())), replace=False, p=weights / weights.sum())
    return [(int(i % labels.shape[1]), int(i // labels.shape[1]), float(weights[i])) for i in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a run directory or checkpoint with two or more students")
    parser.add_argument("--config", default="jobs/configs/camvid.yaml", help="the spec whose train split is used")
    parser.add_argument("--clicks", type=int, default=4, help="new clicks per image and arm")
    parser.add_argument("--seed", type=int, default=0, help="the random arm's seed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(2)
    committee = Committee.load(args.model, None, "torch", 2)
    if not committee.members:
        parser.error(f"{args.model}: one network, no committee to disagree")
    dataset = build_dataset(load_spec(args.config).data, "train")
    rng = np.random.default_rng(args.seed)
    # their own streams: the other arms' draws stay as they were
    weighted_rng, balanced_rng = np.random.default_rng([args.seed, 1]), np.random.default_rng([args.seed, 2])
    picked: dict[str, list] = {arm: [] for arm in ARMS}
    spent = {arm: 0 for arm in ARMS}
    wrong = {arm: 0 for arm in ARMS}  # kept clicks where the served network was wrong: what a click can teach
    for i in range(len(dataset)):
        sample = dataset.load(i)  # original size: the points are in original pixels
        height, width = sample.mask.shape
        [(probs, disagreement)] = committee([committee.served.model_input(sample.image)])
        served, _ = restore_size(probs, height, width)
        doubt = disagreement.numpy()
        labels, confidence = restore_size(probs, *doubt.shape)  # the served network at the map's size

        def in_image(points):
            return in_image_pixels(points, doubt.shape, width, height)

        points = {
            "suggested": suggested_clicks(doubt, args.clicks, width, height),
            "disagreement_max": in_image(lowest_points(-disagreement, args.clicks)),
            "least_confident": in_image(lowest_points(torch.from_numpy(confidence), args.clicks)),
            "random": [{"x": int(x), "y": int(y)} for x, y in
                       zip(rng.integers(0, width, args.clicks), rng.integers(0, height, args.clicks))],
            "segments": in_image(suggest_segment_clicks(labels, doubt, args.clicks)),
            "weighted": in_image(weighted_points(labels, doubt, args.clicks, weighted_rng)),
            "balanced": in_image(weighted_points(labels, doubt, args.clicks, balanced_rng, balance_classes=True)),
        }
        for arm, arm_points in points.items():
            spent[arm] += len(arm_points)
            rank = 1
            for p in arm_points:
                cls = int(sample.mask[p["y"], p["x"]])
                if cls != IGNORE_INDEX:  # the annotator skips what has no class
                    picked[arm].append((sample.image_id, p["x"], p["y"], cls, rank))
                    wrong[arm] += int(served[p["y"], p["x"]] != cls)
                    rank += 1
        if i % 50 == 0:
            print(f"{i}/{len(dataset)} images", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "images": len(dataset), "clicks_per_image": args.clicks}
    for arm in ARMS:
        ids, xs, ys, classes, ranks = zip(*picked[arm]) if picked[arm] else ([],) * 5
        write_click_table(make_click_table(ids, xs, ys, classes, ranks, source="user"), str(out / f"{arm}.parquet"))
        summary[arm] = {"spent": spent[arm], "kept": len(picked[arm]), "served_wrong": wrong[arm],
                        "per_class": np.bincount(np.array(classes, int), minlength=dataset.info.num_classes).tolist()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
