"""Click purity of the active-learning arms (docs/results.md), measured as training measures it
(`seminar.data.inspect.ClickPurity`: each click drawn as a disk of data.click_radius at
data.load_scale; the share of disk pixels on the click's class, void counting as off-class).

    .venv/bin/python scripts/al_click_purity.py random least_confident suggested disagreement_max
"""

from __future__ import annotations

import sys

from seminar.config import load_spec
from seminar.data import build_dataset
from seminar.data.inspect import ClickPurity


def main() -> None:
    spec = load_spec("jobs/configs/camvid.yaml")
    for arm in sys.argv[1:]:
        # the arm's table as data.clicks: the dataset draws those clicks alone, at training scale
        data = spec.data.model_copy(update={"clicks": f"runs/camvid/al/{arm}.parquet"})
        dataset = build_dataset(data, "train")
        purity = ClickPurity(data.click_radius)
        clicks = 0
        for i in range(len(dataset)):
            sample = dataset[i]
            purity.add(sample.clicks, sample.mask)
            clicks += len(sample.clicks)
        print(f"{arm}: {clicks} clicks, purity {purity.overall:.1%} of {sum(purity.drawn.values())} disk pixels")


if __name__ == "__main__":
    main()
