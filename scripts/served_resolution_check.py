"""Does answering at the decoder's stride change the served masks? One checkpoint on its val split:
labels from the probabilities at stride 4 upsampled once to the image's size (`restore_size`,
served since session 10) against the softmax at the input size upsampled again (served before).

    .venv/bin/python scripts/served_resolution_check.py runs/camvid/study-pce2_1pc-s0 [--which teacher_0]

Prints the share of pixels whose label agrees and the mIoU of both against the masks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seminar.config import checkpoint_spec  # noqa: E402
from seminar.data import build_dataset  # noqa: E402
from seminar.metrics import ConfusionMatrix  # noqa: E402
from seminar.predict import Segmenter, restore_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a checkpoint or run directory")
    parser.add_argument("--which", help="the network (default: the one served)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    segmenter = Segmenter.load(args.model, args.which, runtime="torch")
    network = segmenter.network.network  # the bare network (or Ensemble)
    cfg = checkpoint_spec(segmenter.meta["spec"])
    dataset = build_dataset(cfg.data, cfg.data.val_split)
    num_classes = len(segmenter.classes)
    before, after = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    agree = total = 0
    for i in range(len(dataset)):
        sample = dataset.load(i)
        height, width = sample.mask.shape
        x = segmenter.model_input(sample.image).unsqueeze(0)
        with torch.no_grad():
            full = F.interpolate(network(x).softmax(1), size=(height, width), mode="bilinear", align_corners=False)[0]
            old = full.argmax(0).numpy()
            new, _ = restore_size(network.decode(x).softmax(1)[0], height, width)
        agree += int((old == new).sum())
        total += old.size
        mask = torch.from_numpy(sample.mask.astype(np.int64))
        before.update(mask, torch.from_numpy(old.astype(np.int64)))
        after.update(mask, torch.from_numpy(new.astype(np.int64)))
    print(f"{args.model} ({segmenter.which}), {len(dataset)} {cfg.data.val_split} images at their own size: "
          f"labels agree on {100 * agree / total:.2f}% of pixels; mIoU before {before.miou():.4f}, "
          f"stride 4 {after.miou():.4f}")


if __name__ == "__main__":
    main()
