"""How precise the peers' pseudo-labels are at each threshold, against the training masks.

    .venv/bin/python scripts/pseudo_label_precision.py CHECKPOINT [--batches 8]

Loads a checkpoint's teachers (and students), draws training batches exactly as training
does, fuses the other teachers' predictions into student 0's pseudo-label with each `tau` and
`ss_class_fraction`, and prints coverage of the unclicked valid pixels and the accuracy there
(a diagnostic against the ground truth, which training never reads), beside the student's
own accuracy on the same pixels. A checkpoint with one student uses its own teacher as the
peer (what a second student's teacher would be at best).
"""

from __future__ import annotations

import argparse

import torch

from seminar import checkpoint
from seminar.config import TrainConfig
from seminar.data import build_dataset
from seminar.data.base import IGNORE_INDEX
from seminar.data.transforms import SeminarViews
from seminar.engine import StepBatches
from seminar.exchange import CompactPrediction
from seminar.method import fuse_pseudo_labels
from seminar.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    meta = checkpoint.read_meta(args.checkpoint)
    cfg = TrainConfig.model_validate(meta["spec"])
    n = len(meta["classes"])

    def net(k: int, which: str) -> torch.nn.Module:
        spec = cfg.students[k]
        model = build_model(spec.model, n, spec.output_stride, decoder_channels=spec.decoder_channels)
        model.load_state_dict(checkpoint.read_weights(args.checkpoint, k, which))
        return model.eval()

    peers = [net(k, "teacher") for k in range(1, cfg.num_students)] or [net(0, "teacher")]
    student = net(0, "student")
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=cfg.optim.seed)
    batches = StepBatches(train_set, views, [0], cfg.optim.batch_size, 0, 0, 1, cfg.optim.seed, meta["step"],
                          meta["step"] + args.batches)
    settings = [(tau, 0.0) for tau in (0.5, 0.7, 0.8, 0.9, 0.95)] + [(1.0, f) for f in (0.1, 0.2, 0.3, 0.5)] \
        + [(0.9, f) for f in (0.1, 0.2)]
    counts = {s: [0, 0, 0] for s in settings}  # covered, correct, region
    own = [0, 0]
    with torch.no_grad():
        for i in range(len(batches)):
            batch = batches[i]
            preds = [CompactPrediction.from_probs(p(batch["image_weak"]).softmax(1)) for p in peers]
            mask = batch["mask"]
            region = (batch["click_map"] == IGNORE_INDEX) & batch["valid"] & (mask != IGNORE_INDEX)
            guess = student(batch["image_weak"]).argmax(1)
            own[0] += int((guess[region] == mask[region]).sum())
            own[1] += int(region.sum())
            for tau, fraction in settings:
                method = cfg.method.model_copy(update={"tau": tau, "ss_class_fraction": fraction})
                pseudo, _ = fuse_pseudo_labels(preds, method, n, batch["click_map"], batch["valid"])
                covered = (pseudo != IGNORE_INDEX) & region
                counts[(tau, fraction)][0] += int(covered.sum())
                counts[(tau, fraction)][1] += int((pseudo[covered] == mask[covered]).sum())
                counts[(tau, fraction)][2] += int(region.sum())
    print(f"{args.checkpoint} (step {meta['step']}), {args.batches} batches; student 0's own accuracy on the "
          f"unclicked pixels: {own[0] / own[1]:.3f}")
    print("| tau | ss_class_fraction | coverage | pseudo-label accuracy |")
    print("|---|---|---|---|")
    for (tau, fraction), (covered, correct, region) in counts.items():
        print(f"| {tau} | {fraction} | {covered / region:.3f} | {correct / max(covered, 1):.3f} |")


if __name__ == "__main__":
    main()
