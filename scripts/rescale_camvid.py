"""A CamVid copy at another scale, pixel for pixel what `data.load_scale` makes on load.

Used to ship the study's data to a machine it is not on (a GPU box takes 64 MiB of files):
train there with `data.root=<copy>` and `data.load_scale=1`; images, masks and the clicks
simulated from them equal those of `data.load_scale=<scale>` on the original.

    .venv/bin/python scripts/rescale_camvid.py ../shared/data/camvid .gpu/camvid 0.5
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from seminar.config import DataConfig
from seminar.data import CamVidDataset
from seminar.data.datasets import CAMVID_VOID, rescale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("scale", type=float)
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)
    for split in ("train", "val"):
        dataset = CamVidDataset(DataConfig(dataset="camvid", root=str(source)), split)
        lines = []
        for i in range(len(dataset)):
            sample = rescale(dataset.load(i), args.scale)
            mask = sample.mask.copy()
            mask[mask == 255] = CAMVID_VOID  # back to the file's void id
            image_rel = f"{split}/{dataset.image_ids[i]}.png"
            mask_rel = f"{split}annot/{dataset.image_ids[i]}.png"
            for rel, pixels in ((image_rel, sample.image), (mask_rel, mask)):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(pixels)).save(target / rel, optimize=True)
            lines.append(f"{image_rel} {mask_rel}")
        (target / f"{split}.txt").write_text("\n".join(lines) + "\n")
        print(f"{split}: {len(lines)} images -> {target}")
    for extra in ("README", "README.md"):
        if (source / extra).is_file():
            shutil.copy(source / extra, target / extra)


if __name__ == "__main__":
    main()
