"""What every dataset yields, and the constants shared by all of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255
# ImageNet statistics: the normalisation torchvision-pretrained backbones expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file (and pixel) at fault."""


@dataclass
class Sample:
    """One image with its annotations, in original (or load-scaled) pixels."""

    image_id: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    mask: np.ndarray | None  # uint8 [H, W]: class ids, IGNORE_INDEX = ignore; None = no ground truth
    clicks: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    # float32 [N, 3]: (x = column, y = row, cls), zero-indexed pixels of `image`


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    click_source: str  # wtp_main, wtp_supp, simulated, user, or a '+'-joined mix

    @property
    def num_classes(self) -> int:
        return len(self.classes)
