"""The datasets: synthetic shapes, Pascal VOC 2012 (+ SBD), CamVid, and a user's folder.

Each is a torch Dataset of `Sample`s (image, mask or None, clicks) with `.info` and
`.image_ids`. Everything that can be checked before training is checked when the dataset
is built: image files exist and decode (a truncated JPEG is found here, not when training
samples it), click tables name known images and classes, masks hold only class ids or 255
(every image and mask for sets up to CHECK_LIMIT images, once per process; larger sets
check the headers now and each file when it is read). Errors name the file and, for masks,
the first bad pixel. A root may be a URI (s3://...; `seminar.data.files`): its listing, split
files and click tables are checked when the dataset is built, each image and mask when a
worker reads it (workers fetch only what their batches draw).
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from torch.utils.data import Dataset

from seminar.config import DataConfig
from seminar.data.base import IGNORE_INDEX, DatasetError, DatasetInfo, Sample
from seminar.data.files import DataFile, DataRoot
from seminar.data.transforms import resize_image
from seminar.data.clicks import (
    ClickFit,
    click_sources,
    clicks_by_image,
    concat_click_tables,
    fit_clicks_to_image,
    load_clicks,
    simulate_clicks,
    validate_clicks,
)

CHECK_LIMIT = 3000  # decode every image and mask at construction up to this many images

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
CAMVID_VOID = 11
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def voc_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The standard VOC colour map (bits of the class id spread over R, G, B)."""
    colours = []
    for c in range(num_classes):
        r = g = b = 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


# ---------------------------------------------------------------------------------------
# Reading and checking files (`DataFile`s of a local or remote root: seminar.data.files).


@contextlib.contextmanager
def _opened(f: DataFile, what: str = "image") -> Iterator[Image.Image]:
    with f.open() as fh:
        try:
            im = Image.open(fh)
        except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise DatasetError(f"{f.name}: not a readable {what} ({' '.join(str(e).split())[:160]})") from None
        with im:
            yield im


def _decoded(im: Image.Image, f: DataFile, what: str) -> Image.Image:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt
        raise DatasetError(f"{f.name}: {what} does not decode ({' '.join(str(e).split())[:160]})") from None
    return im


def read_image(f: DataFile) -> np.ndarray:
    with _opened(f) as im:
        return np.asarray(_decoded(im, f, "image").convert("RGB"))


def image_size(f: DataFile) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with _opened(f) as im:
        return im.height, im.width


@functools.lru_cache(maxsize=None)
def checked_image_size(f: DataFile) -> tuple[int, int]:
    """(height, width) of an image that decodes in full; once per file version and process."""
    with _opened(f) as im:
        return _decoded(im, f, "image").height, im.width


def read_index_png(f: DataFile) -> np.ndarray:
    """A mask PNG of class ids: palette (VOC) or greyscale (CamVid), never colour."""
    with _opened(f, "mask") as im:
        if im.mode not in ("P", "L"):
            raise DatasetError(f"{f.name}: mask is a {im.mode} image; expected class ids (palette or greyscale PNG)")
        return np.array(_decoded(im, f, "mask"))


def image_sizes(image_ids: list[str], files: list[DataFile]) -> dict[str, tuple[int, int]] | None:
    """Every image's (height, width): decoded in full for sets up to CHECK_LIMIT images.
    None for a remote root: each worker reads only the images its batches need, so images
    are checked (and their clicks fitted) when read."""
    if files and files[0].root.remote:
        return None
    size = checked_image_size if len(files) <= CHECK_LIMIT else image_size
    return {i: size(f) for i, f in zip(image_ids, files)}


def read_sbd_mask(f: DataFile) -> np.ndarray:
    with f.open() as fh:
        mat = scipy.io.loadmat(fh, squeeze_me=True, struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation, np.uint8)


def check_mask(mask: np.ndarray, num_classes: int, f: DataFile, size: tuple[int, int] | None = None) -> None:
    """Raise unless the mask holds only 0..num_classes-1 and IGNORE_INDEX (and has `size`)."""
    if size is not None and mask.shape != size:
        raise DatasetError(f"{f.name}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[1]}x{size[0]}")
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DatasetError(
            f"{f.name}: unexpected mask value {mask[row, col]} at pixel (row {row}, col {col}); "
            f"expected 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)"
        )


def _files(root: DataRoot, keys: list[str], what: str) -> list[DataFile]:
    missing = [k for k in keys if not root.is_file(k)]
    if missing:
        raise DatasetError(f"{root.name(missing[0])}: {what} not found ({len(missing)} missing)")
    return [root.file(k) for k in keys]


def _read_split(root: DataRoot, key: str, limit: int | None) -> list[str]:
    if not root.is_file(key):
        raise DatasetError(f"{root.name(key)}: split file not found")
    try:
        text = root.read_bytes(key).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{root.name(key)}: not UTF-8 (byte {e.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()][:limit]
    if not lines:
        raise DatasetError(f"{root.name(key)}: the split lists no images")
    return lines


def _seed_of(image_id: str) -> int:
    """A stable per-image seed (Python's hash() changes between processes)."""
    return zlib.crc32(image_id.encode())


def rescale(sample: Sample, scale: float) -> Sample:
    """Resize image (bilinear), mask (nearest) and click coordinates by `scale`."""
    if scale == 1:
        return sample
    height, width = sample.image.shape[:2]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = resize_image(sample.image, (new_h, new_w))
    mask = None
    if sample.mask is not None:
        mask = np.asarray(Image.fromarray(sample.mask).resize((new_w, new_h), Image.NEAREST))
    clicks = sample.clicks.copy()
    # Pixel centres map to pixel centres, as in the resize itself.
    clicks[:, 0] = np.clip((clicks[:, 0] + 0.5) * new_w / width - 0.5, 0, new_w - 1)
    clicks[:, 1] = np.clip((clicks[:, 1] + 0.5) * new_h / height - 0.5, 0, new_h - 1)
    return Sample(sample.image_id, image, mask, clicks)


# ---------------------------------------------------------------------------------------
# The shared shape of every dataset.


class SegmentationDataset(Dataset):
    """`load(i)` reads sample i at its original size; `__getitem__` applies load_scale
    (`at_scale`, which callers holding an original already use instead of decoding again)
    and leaves out the clicks of unclicked images.

    `clicked[i]` says whether image i has clicks to train on (known without reading it):
    training draws clicked and unclicked images from two streams."""

    info: DatasetInfo
    image_ids: list[str]
    clicked: np.ndarray  # bool per image
    load_scale: float = 1.0
    click_fit: ClickFit | None  # stray clicks clipped / dropped when fitted to their images (None: remote, fitted as read)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> Sample:
        sample = self.at_scale(i, self.load(i))
        return sample if self.clicked[i] else replace(sample, clicks=np.zeros((0, 3), np.float32))

    def load(self, i: int) -> Sample:
        raise NotImplementedError

    def at_scale(self, i: int, sample: Sample) -> Sample:
        """Sample i, as `load(i)` gave it, at the scale training sees it."""
        return rescale(sample, self.load_scale)


def _load_click_tables(
    cfg: DataConfig, num_classes: int, known_ids: set[str]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read and check cfg.clicks and cfg.extra_clicks; return (per-image clicks, sources)."""
    tables = []
    for path in [p for p in [cfg.clicks, *cfg.extra_clicks] if p]:
        table = load_clicks(path)
        if table.num_rows == 0:  # a run "from clicks" that has none would train on nothing
            raise DatasetError(f"{path}: the click table holds no clicks (0 rows)")
        validate_clicks(table, num_classes, known_ids, path=path)
        tables.append(table)
    if not tables:  # a set to score on (build_dataset clicks=False)
        return {}, []
    merged = concat_click_tables(tables)
    return clicks_by_image(merged), click_sources(merged)


def _fit_all(
    clicks: dict[str, np.ndarray], image_ids: list[str], sizes: dict[str, tuple[int, int]] | None
) -> tuple[dict[str, np.ndarray], ClickFit | None]:
    """The split's images' clicks, and what fitting them to their images clips and drops
    (None while the sizes are unknown: a remote root). `load` fits them (`_fitted`), so an
    image reads the same from a local and a remote copy."""
    mine = {i: clicks.get(i, np.zeros((0, 3), np.float32)) for i in image_ids}
    if sizes is None:
        return mine, None
    total = ClickFit()
    for image_id in image_ids:
        total = total + fit_clicks_to_image(mine[image_id], *sizes[image_id])[1]
    return mine, total


def _fitted(clicks: np.ndarray, image: np.ndarray) -> np.ndarray:
    return fit_clicks_to_image(clicks, *image.shape[:2])[0]


# ---------------------------------------------------------------------------------------
# Synthetic shapes.

SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "ellipse", "hexagon")


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Pixels inside a shape of circumradius ~r centred at (cy, cx), rotated by `angle`."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = (xx - cx) * cos + (yy - cy) * sin
    v = -(xx - cx) * sin + (yy - cy) * cos
    d = np.hypot(u, v)
    if kind == "disk":
        return d <= r
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    if kind == "triangle":  # three half-planes; inradius 0.65 r gives about the others' area
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.65 * r for a in (np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6)], 0)
    if kind == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if kind == "cross":
        return ((abs(u) <= 0.3 * r) & (abs(v) <= r)) | ((abs(v) <= 0.3 * r) & (abs(u) <= r))
    if kind == "diamond":
        return abs(u) + abs(v) <= r
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    if kind == "hexagon":
        return np.all([abs(u * np.cos(a) + v * np.sin(a)) <= 0.87 * r for a in (0, np.pi / 3, 2 * np.pi / 3)], 0)
    raise ValueError(kind)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, upsampled bilinearly."""
    grid = rng.random((cells, cells))
    return np.asarray(Image.fromarray(grid.astype(np.float32)).resize((size, size), Image.BILINEAR))


def render_synthetic(
    rng: np.random.Generator, size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """An image of 1-4 shapes on a textured background and its mask.

    Each foreground class c is one shape kind with its own hue band, saturated, on a
    greyish textured background: separable by colour and shape, so a small network learns
    it from clicks in minutes. Later shapes occlude earlier ones.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.35, 0.75)))
    angle = rng.uniform(0, np.pi)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(0.2, 0.8))
    texture = 0.6 + 0.5 * _smooth_noise(rng, size, 6) + 0.15 * stripes
    image = tint * texture[..., None]
    mask = np.zeros((size, size), np.uint8)
    num_foreground = num_classes - 1
    for _ in range(rng.integers(1, 5)):
        c = int(rng.integers(1, num_classes))
        r = rng.uniform(0.15, 0.28) * size  # large against a stride-16 feature map
        cy, cx = rng.uniform(0.5 * r, size - 0.5 * r, size=2)
        inside = _shape_mask(SHAPES[(c - 1) % len(SHAPES)], yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        hue = ((c - 1) / num_foreground + rng.uniform(-0.15, 0.15) / num_foreground) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0)))
        shading = 0.85 + 0.3 * _smooth_noise(rng, size, 4)
        image[inside] = colour * shading[inside][:, None]
        mask[inside] = c
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


class SyntheticDataset(SegmentationDataset):
    """Shapes on textured backgrounds, generated from (seed, split, index); no files."""

    def __init__(self, cfg: DataConfig, role: str, limit: int | None = None):
        syn = cfg.synthetic
        count = syn.num_train if role == "train" else syn.num_val
        self.size, self.num_classes = syn.image_size, syn.num_classes
        # Train and val draw from different streams (role is part of the seed).
        self.split_code = 0 if role == "train" else 1
        self.seed, self.click_seed, self.min_area = syn.seed, cfg.click_seed, cfg.simulated_min_area
        self.click_radius, self.clicks_per_class = cfg.click_radius, cfg.simulated_clicks_per_class
        self.image_ids = [f"{role}_{i:05d}" for i in range(count)][:limit]
        self.clicked = np.ones(len(self.image_ids), bool)  # simulated: every image
        self.load_scale = cfg.load_scale
        self.click_fit = ClickFit()
        classes = ("background", *(f"{SHAPES[(c - 1) % len(SHAPES)]}_{c}" for c in range(1, self.num_classes)))
        self.info = DatasetInfo("synthetic", classes, voc_palette(self.num_classes), "simulated")

    def load(self, i: int) -> Sample:
        image, mask = render_synthetic(np.random.default_rng([self.seed, self.split_code, i]), self.size, self.num_classes)
        image_id = self.image_ids[i]
        clicks = simulate_clicks(mask, self.num_classes, self.min_area, [self.click_seed, _seed_of(image_id)],
                                 radius=self.click_radius, per_class=self.clicks_per_class)
        return Sample(image_id, image, mask, clicks)


# ---------------------------------------------------------------------------------------
# Pascal VOC 2012 (+ SBD for train_aug).


class VOCDataset(SegmentationDataset):
    """`root` is VOCdevkit/VOC2012; masks from SegmentationClass, else SBD, else None.

    Clicks come from cfg.clicks (+ extra_clicks), What's the Point JSON or Parquet. They
    hold no background clicks, so with cfg.simulate_background one simulated background
    click per background region of the ground truth is added, and the click source says
    so (`wtp_main+simulated_bg_from_gt`). Without cfg.clicks, every click is simulated
    from the ground truth (`simulated`).
    """

    def __init__(self, cfg: DataConfig, split: str, limit: int | None = None):
        root = DataRoot(cfg.root)
        sbd = DataRoot(cfg.sbd_root) if cfg.sbd_root else None
        self.image_ids = _read_split(root, f"ImageSets/Segmentation/{split}.txt", limit)
        self.image_paths = _files(root, [f"JPEGImages/{i}.jpg" for i in self.image_ids], "image")
        self.mask_paths = [self._find_mask(root, sbd, i) for i in self.image_ids]
        self.load_scale, self.min_area, self.click_seed = cfg.load_scale, cfg.simulated_min_area, cfg.click_seed
        self.clicks_per_class = cfg.simulated_clicks_per_class
        self.num_classes = len(VOC_CLASSES)
        sizes = image_sizes(self.image_ids, self.image_paths)
        if sizes is not None and len(self.image_ids) <= CHECK_LIMIT:
            for image_id, path in zip(self.image_ids, self.mask_paths):
                if path is not None:
                    self._read_mask(path, sizes[image_id])

        self.simulate_all = cfg.clicks is None
        self.simulate_background = cfg.simulate_background and not self.simulate_all
        if self.simulate_all:
            self.clicks, self.click_fit, source = {}, ClickFit(), "simulated"
        else:
            known = {Path(name).stem for name in root.names("JPEGImages")}
            clicks, sources = _load_click_tables(cfg, self.num_classes, known)
            self.clicks, self.click_fit = _fit_all(clicks, self.image_ids, sizes)
            if self.simulate_background:
                sources.append("simulated_bg_from_gt")
            source = "+".join(sources)
        # images with clicks of their own (simulated ones: those with a mask); simulated
        # background clicks alone do not make an image clicked
        self.clicked = np.array([p is not None if self.simulate_all else len(self.clicks[i]) > 0
                                 for i, p in zip(self.image_ids, self.mask_paths)], bool)
        self.info = DatasetInfo("voc", VOC_CLASSES, voc_palette(self.num_classes), source)

    @staticmethod
    def _find_mask(root: DataRoot, sbd: DataRoot | None, image_id: str) -> DataFile | None:
        png = f"SegmentationClass/{image_id}.png"
        if root.is_file(png):
            return root.file(png)
        mat = f"dataset/cls/{image_id}.mat"
        if sbd is not None and sbd.is_file(mat):
            return sbd.file(mat)
        return None  # detection-only images have no ground truth

    def _read_mask(self, path: DataFile, size: tuple[int, int] | None = None) -> np.ndarray:
        mask = read_sbd_mask(path) if path.suffix == ".mat" else read_index_png(path)
        check_mask(mask, self.num_classes, path, size)
        return mask

    def load(self, i: int) -> Sample:
        image_id = self.image_ids[i]
        image = read_image(self.image_paths[i])
        path = self.mask_paths[i]
        mask = None if path is None else self._read_mask(path, image.shape[:2])
        seed = [self.click_seed, _seed_of(image_id)]
        if self.simulate_all:
            clicks = np.zeros((0, 3), np.float32)
            if mask is not None:
                clicks = simulate_clicks(mask, self.num_classes, self.min_area, seed, per_class=self.clicks_per_class)
        else:
            clicks = _fitted(self.clicks[image_id], image)
            if self.simulate_background and mask is not None:
                background = simulate_clicks(mask, self.num_classes, self.min_area, seed, classes=[0],
                                             per_class=self.clicks_per_class)
                clicks = np.concatenate([clicks, background])
        return Sample(image_id, image, mask, clicks)


# ---------------------------------------------------------------------------------------
# CamVid (SegNet's 11-class version).


def _resolve_listed(root: DataRoot, listed: str) -> str:
    """The key of a path from a CamVid list file, relative to root.

    SegNet's lists carry its own prefix (`/SegNet/CamVid/trainannot/x.png`); where the
    path does not exist under root, its last two parts (`trainannot/x.png`) are tried.
    """
    key = listed.lstrip("/")
    return key if root.is_file(key) else "/".join(Path(listed).parts[-2:])


class CamVidDataset(SegmentationDataset):
    """`root/{split}.txt` lists `IMAGE MASK` per line; 11 classes, void (11) -> 255.

    CamVid has no human clicks: they are simulated from the masks (seeded by
    cfg.click_seed) and labelled `simulated`. A click table in cfg.clicks replaces them;
    cfg.extra_clicks (corrections from the page, an active-learning round) add to either.
    """

    def __init__(self, cfg: DataConfig, split: str, limit: int | None = None):
        root = DataRoot(cfg.root)
        image_keys, mask_keys = [], []
        for number, line in enumerate(_read_split(root, f"{split}.txt", limit), start=1):
            fields = line.split()
            if len(fields) != 2:
                raise DatasetError(f"{root.name(f'{split}.txt')}: line {number}: expected 'IMAGE MASK', got {line!r}")
            image_keys.append(_resolve_listed(root, fields[0]))
            mask_keys.append(_resolve_listed(root, fields[1]))
        self.image_paths = _files(root, image_keys, "image")
        self.mask_paths = _files(root, mask_keys, "mask")
        self.image_ids = [f.stem for f in self.image_paths]
        self.load_scale, self.min_area, self.click_seed = cfg.load_scale, cfg.simulated_min_area, cfg.click_seed
        self.click_radius, self.clicks_per_class = cfg.click_radius, cfg.simulated_clicks_per_class
        self.simulate = cfg.clicks is None
        self._clicks: dict[int, np.ndarray] = {}
        sizes = image_sizes(self.image_ids, self.image_paths)
        self.file_clicks, self.click_fit, sources = {}, ClickFit(), ["simulated"] if self.simulate else []
        if cfg.clicks or cfg.extra_clicks:
            # ids of every split, so that one table can serve the train and the val dataset
            known = {Path(line.split()[0]).stem for txt in root.names() if txt.endswith(".txt")
                     for line in _read_split(root, txt, None)}
            clicks, file_sources = _load_click_tables(cfg, len(CAMVID_CLASSES), known)
            self.file_clicks, self.click_fit = _fit_all(clicks, self.image_ids, sizes)
            sources += [s for s in file_sources if s not in sources]
        self.clicked = np.array([self.simulate or len(self.file_clicks.get(i, ())) > 0 for i in self.image_ids], bool)
        self.info = DatasetInfo("camvid", CAMVID_CLASSES, CAMVID_PALETTE, "+".join(sources))
        if sizes is not None and len(self.image_ids) <= CHECK_LIMIT:
            for image_id, mask_path in zip(self.image_ids, self.mask_paths):
                self._read_mask(mask_path, sizes[image_id])

    def _read_mask(self, path: DataFile, size: tuple[int, int] | None = None) -> np.ndarray:
        mask = read_index_png(path)
        mask[mask == CAMVID_VOID] = IGNORE_INDEX
        check_mask(mask, len(CAMVID_CLASSES), path, size)
        return mask

    def load(self, i: int) -> Sample:
        """Sample i at its original size, with the click files' clicks (simulated ones come at load_scale)."""
        image = read_image(self.image_paths[i])
        clicks = _fitted(self.file_clicks.get(self.image_ids[i], np.zeros((0, 3), np.float32)), image)
        return Sample(self.image_ids[i], image, self._read_mask(self.mask_paths[i], image.shape[:2]), clicks)

    def at_scale(self, i: int, sample: Sample) -> Sample:
        # Clicks are simulated on the mask at the resolution training sees, so that each
        # click's disk stays on its object there.
        sample = rescale(sample, self.load_scale)
        if not self.simulate:
            return sample
        if i not in self._clicks:  # simulating costs more than decoding: once per image and process
            self._clicks[i] = simulate_clicks(sample.mask, len(CAMVID_CLASSES), self.min_area,
                                              [self.click_seed, _seed_of(sample.image_id)], radius=self.click_radius,
                                              per_class=self.clicks_per_class)
        return replace(sample, clicks=np.concatenate([self._clicks[i], sample.clicks]))


# ---------------------------------------------------------------------------------------
# A user's folder.


class FolderDataset(SegmentationDataset):
    """`root/images/*.{jpg,jpeg,png}`, optional `root/masks/<id>.png`, a click table.

    The split is `root/{split}.txt` (one image id per line) when that file exists, else
    every image. Classes come from cfg.classes; the click source from the table (`user`
    when it names none).
    """

    def __init__(self, cfg: DataConfig, split: str, limit: int | None = None):
        root = DataRoot(cfg.root)
        if not root.is_dir("images"):
            raise DatasetError(f"{root.name('images')}: image folder not found")
        by_id: dict[str, str] = {}
        for name in root.names("images"):
            path = Path(name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if path.stem in by_id:
                    raise DatasetError(f"{root.name(f'images/{name}')}: two images share the id '{path.stem}' "
                                       f"({by_id[path.stem]})")
                by_id[path.stem] = name
        split_file = f"{split}.txt"
        self.image_ids = _read_split(root, split_file, limit) if root.is_file(split_file) else sorted(by_id)[:limit]
        if not self.image_ids:
            raise DatasetError(f"{root.name('images')}: no images (.jpg, .jpeg, .png)")
        unknown = [i for i in self.image_ids if i not in by_id]
        if unknown:
            raise DatasetError(f"{root.name(split_file)}: image '{unknown[0]}' not found in {root.name('images')} "
                               f"({len(unknown)} missing)")
        self.image_paths = [root.file(f"images/{by_id[i]}") for i in self.image_ids]
        self.mask_paths = [root.file(f"masks/{i}.png") if root.is_file(f"masks/{i}.png") else None
                           for i in self.image_ids]
        self.num_classes = len(cfg.classes)
        self.load_scale = cfg.load_scale
        sizes = image_sizes(self.image_ids, self.image_paths)
        if sizes is not None and len(self.image_ids) <= CHECK_LIMIT:
            for image_id, path in zip(self.image_ids, self.mask_paths):
                if path is not None:
                    self._read_mask(path, sizes[image_id])
        clicks, sources = _load_click_tables(cfg, self.num_classes, set(by_id))
        self.clicks, self.click_fit = _fit_all(clicks, self.image_ids, sizes)
        self.clicked = np.array([len(self.clicks[i]) > 0 for i in self.image_ids], bool)  # the rest: unclicked
        self.info = DatasetInfo("folder", tuple(cfg.classes), voc_palette(self.num_classes), "+".join(sources) or "user")

    def _read_mask(self, path: DataFile, size: tuple[int, int] | None = None) -> np.ndarray:
        mask = read_index_png(path)
        check_mask(mask, self.num_classes, path, size)
        return mask

    def load(self, i: int) -> Sample:
        image = read_image(self.image_paths[i])
        path = self.mask_paths[i]
        mask = None if path is None else self._read_mask(path, image.shape[:2])
        return Sample(self.image_ids[i], image, mask, _fitted(self.clicks[self.image_ids[i]], image))


# ---------------------------------------------------------------------------------------


def build_dataset(cfg: DataConfig, split: str, clicks: bool = True) -> SegmentationDataset:
    """The training or validation set of cfg; `clicks=False` for a set to score on (masks
    only: the click tables are not read, so a model evaluates on data its table never named).

    `split` is "train" or "val" (or the configured split names, e.g. "train_aug"): the
    split file is cfg.train_split / cfg.val_split and max_train / max_val truncate it.
    """
    if split in ("train", cfg.train_split):
        role, name, limit = "train", cfg.train_split, cfg.max_train
    elif split in ("val", cfg.val_split):
        role, name, limit = "val", cfg.val_split, cfg.max_val
    else:
        raise ValueError(f"unknown split '{split}': expected 'train' or 'val' ({cfg.train_split}/{cfg.val_split})")
    if not clicks:
        cfg = cfg.model_copy(update={"clicks": None, "extra_clicks": []})
    if cfg.dataset == "synthetic":
        dataset = SyntheticDataset(cfg, role, limit)
    else:
        datasets = {"voc": VOCDataset, "camvid": CamVidDataset, "folder": FolderDataset}
        dataset = datasets[cfg.dataset](cfg, name, limit)
    if role == "train" and cfg.clicked_images is not None:
        keep_clicked_subset(dataset, cfg.clicked_images, cfg.click_seed)
    return dataset


def keep_clicked_subset(dataset: SegmentationDataset, clicked_images: int | float, seed: int) -> None:
    """Keep the clicks of `clicked_images` (a count, or a fraction) of the clicked images,
    drawn with `seed`: the first ones of one seeded order, so a smaller subset lies inside a
    larger one. The others become unclicked images."""
    clicked = np.flatnonzero(dataset.clicked)
    count = clicked_images if isinstance(clicked_images, int) else max(1, round(clicked_images * len(clicked)))
    if count > len(clicked):
        raise DatasetError(f"data.clicked_images: {count} asked for, but only {len(clicked)} of the "
                           f"{len(dataset)} training images have clicks")
    order = np.random.default_rng([seed, 0x5EED]).permutation(clicked)
    dataset.clicked = np.zeros(len(dataset), bool)
    dataset.clicked[order[:count]] = True
