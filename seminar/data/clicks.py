"""The click table: one row per click, read from What's the Point JSON or Parquet.

Columns: `image_id` string, `x` float32 (column), `y` float32 (row), both
zero-indexed in original-image pixels, `cls` int16, `rank` int16 (the annotator's n-th
click for that class in that image), `source` string (`wtp_main`, `wtp_supp`,
`simulated`, `user`).

A table is a `pyarrow.Table`. Images listed with no clicks (What's the Point has a few)
cannot be rows, so their ids travel in the schema metadata (`empty_image_ids`), which
Parquet keeps; `clicks_by_image` and the inspect report read them from there.

Every problem with a click file raises one `ClickFileError` that names the file, the
image id, the click index (its position in that image's list) and the field.
"""

from __future__ import annotations

import datetime
import json
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import ndimage

from seminar import storage
from seminar.data.base import IGNORE_INDEX
from seminar.untrusted import UntrustedJSONError, parse_json

CLICK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("cls", pa.int16()),
        ("rank", pa.int16()),
        ("source", pa.string()),
    ]
)
CLICK_SOURCES = ("wtp_main", "wtp_supp", "simulated", "user")
EMPTY_IMAGES_KEY = b"empty_image_ids"


class ClickFileError(ValueError):
    """A click file or table that cannot be used; the message says where and why."""


# What a click's fields may hold before the dataset is known: coordinates inside any real
# image, a class that fits a uint8 label map (255 is "ignore"), a rank int16 can hold.
MAX_COORD = 1e6
FIELD_RANGES = {"x": (-MAX_COORD, MAX_COORD), "y": (-MAX_COORD, MAX_COORD), "cls": (0, IGNORE_INDEX - 1),
                "rank": (1, 32767)}


def _where(path: str, image_id: str | None = None, index: int | None = None, field: str | None = None) -> str:
    parts = [str(path)]
    if image_id is not None:
        parts.append(f"image '{image_id}'")
    if index is not None:
        parts.append(f"click {index}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)


def _click_index(image_ids: np.ndarray, row: int) -> int:
    """Position of a row among its image's clicks (what the error messages call 'click')."""
    return int(np.sum(image_ids[:row] == image_ids[row]))


# ---------------------------------------------------------------------------------------
# Files: local paths or s3://bucket/key, through pyarrow filesystems.


def _read_bytes(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise ClickFileError(f"{path}: click file not found") from None


# ---------------------------------------------------------------------------------------
# Building tables.


def make_click_table(
    image_ids: Sequence[str],
    x: Sequence[float],
    y: Sequence[float],
    cls: Sequence[int],
    rank: Sequence[int],
    source: str | Sequence[str],
    empty_ids: Iterable[str] = (),
) -> pa.Table:
    """A click table from columns; `source` is one name for all rows or one per row.

    `empty_ids` are images listed with no clicks (kept in the schema metadata).
    """
    sources = [source] * len(image_ids) if isinstance(source, str) else list(source)
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "x": pa.array(np.asarray(x, np.float32)),
            "y": pa.array(np.asarray(y, np.float32)),
            "cls": pa.array(np.asarray(cls, np.int16)),
            "rank": pa.array(np.asarray(rank, np.int16)),
            "source": pa.array(sources, pa.string()),
        },
        schema=CLICK_SCHEMA,
    )
    return with_empty_image_ids(table, empty_ids)


def with_empty_image_ids(table: pa.Table, image_ids: Iterable[str]) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata[EMPTY_IMAGES_KEY] = json.dumps(sorted(set(image_ids))).encode()
    return table.replace_schema_metadata(metadata)


def empty_image_ids(table: pa.Table, path: str = "click table") -> list[str]:
    """Images that were listed with no clicks."""
    raw = (table.schema.metadata or {}).get(EMPTY_IMAGES_KEY)
    if not raw:
        return []
    try:
        ids = parse_json(raw, path)
    except UntrustedJSONError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ClickFileError(f"{path}: schema metadata '{EMPTY_IMAGES_KEY.decode()}' is not a JSON list of image ids")
    return ids


def concat_click_tables(tables: Sequence[pa.Table]) -> pa.Table:
    """Rows of all tables; an image is empty only if no table has a click for it."""
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    clicked = set(pc.unique(merged["image_id"]).to_pylist())
    empty = {i for t in tables for i in empty_image_ids(t)} - clicked
    return with_empty_image_ids(merged, empty)


def click_sources(table: pa.Table) -> list[str]:
    """The distinct sources of a table, in order of first appearance."""
    return list(dict.fromkeys(table["source"].to_pylist()))


# ---------------------------------------------------------------------------------------
# What's the Point JSON: {"2007_000032": [{"x": .., "y": .., "cls": .., "rank": ..}, ...]}


def _number(value, path: str, image_id: str, index: int, field: str, integer: bool) -> float:
    # bool is an int in Python; a click coordinate of `true` is a broken file, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClickFileError(f"{_where(path, image_id, index, field)}: expected a number, got {value!r}")
    if integer and value != int(value):
        raise ClickFileError(f"{_where(path, image_id, index, field)}: expected an integer, got {value!r}")
    low, high = FIELD_RANGES[field]
    if not low <= value <= high:
        raise ClickFileError(f"{_where(path, image_id, index, field)}: {value!r} is outside {low:g}..{high:g}")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names a key twice would silently keep only its last list."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ClickFileError(f"image '{key}' is listed twice")
        seen[key] = value
    return seen


def read_wtp_json(path: str, source: str) -> pa.Table:
    """Read a What's the Point click file into a click table labelled `source`."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ClickFileError(f"{path}: line {line}: not UTF-8 (byte {e.start})") from None
    try:
        data = parse_json(text, path, object_pairs_hook=_unique_keys)  # a key listed twice: refused there too
    except UntrustedJSONError as e:
        raise ClickFileError(str(e)) from None
    if not isinstance(data, dict):
        raise ClickFileError(f"{path}: expected a JSON object mapping image ids to click lists")
    ids, xs, ys, classes, ranks, empty = [], [], [], [], [], []
    for image_id, clicks in data.items():
        if not image_id or not image_id.isprintable():  # also lone surrogates, which no file can name
            raise ClickFileError(f"{path}: image id {image_id!r} is not printable text")
        if not isinstance(clicks, list):
            raise ClickFileError(f"{_where(path, image_id)}: expected a list of clicks, got {type(clicks).__name__}")
        if not clicks:
            empty.append(image_id)
        for index, click in enumerate(clicks):
            if not isinstance(click, dict):
                raise ClickFileError(f"{_where(path, image_id, index)}: expected an object with x, y, cls, rank")
            for field in ("x", "y", "cls", "rank"):
                if field not in click:
                    raise ClickFileError(f"{_where(path, image_id, index, field)}: missing")
            ids.append(image_id)
            xs.append(_number(click["x"], path, image_id, index, "x", integer=False))
            ys.append(_number(click["y"], path, image_id, index, "y", integer=False))
            classes.append(_number(click["cls"], path, image_id, index, "cls", integer=True))
            ranks.append(_number(click["rank"], path, image_id, index, "rank", integer=True))
    return make_click_table(ids, xs, ys, classes, ranks, source, empty)


# ---------------------------------------------------------------------------------------
# Parquet.


def write_click_table(table: pa.Table, path: str) -> None:
    """Write a click table, all or nothing (a reader never sees half a file)."""
    typed = table.select(CLICK_SCHEMA.names).cast(CLICK_SCHEMA)
    buffer = pa.BufferOutputStream()
    pq.write_table(with_empty_image_ids(typed, empty_image_ids(table)), buffer)
    storage.write_bytes(path, buffer.getvalue().to_pybytes())


def _first_null_row(column: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def read_click_table(path: str, source: str | None = None) -> pa.Table:
    """Read a Parquet click table and check its schema.

    Numeric columns of another width (int64 classes written by pandas) are cast when the
    values fit. `rank` may be absent (every click is rank 1), and so may `source` (then
    `source`, default `user`, labels every row).
    """
    fs, inner = storage.filesystem(path)
    try:
        raw = pq.read_table(inner, filesystem=fs)
    except FileNotFoundError:
        raise ClickFileError(f"{path}: click file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ClickFileError(f"{path}: not a readable Parquet file: {e}") from None
    n = raw.num_rows
    columns = {}
    for name, expected in zip(CLICK_SCHEMA.names, CLICK_SCHEMA.types):
        if name not in raw.column_names:
            if name == "rank":
                columns[name] = pa.chunked_array([pa.array(np.ones(n, np.int16))])
                continue
            if name == "source":
                columns[name] = pa.chunked_array([pa.array([source or "user"] * n, pa.string())])
                continue
            raise ClickFileError(f"{path}: column '{name}' is missing (expected {expected})")
        column = raw[name]
        if column.null_count:
            row = _first_null_row(column)
            if name == "image_id":
                raise ClickFileError(f"{path}, row {row}, field 'image_id': null value")
            ids = raw["image_id"].to_numpy(zero_copy_only=False)
            raise ClickFileError(f"{_where(path, ids[row], _click_index(ids, row), name)}: null value (row {row})")
        try:
            columns[name] = column.cast(expected, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ClickFileError(f"{path}: column '{name}' has type {column.type}, expected {expected}") from None
    table = pa.table(columns, schema=CLICK_SCHEMA)
    ids = None
    for name, (low, high) in FIELD_RANGES.items():
        values = table[name].to_numpy()
        bad = np.flatnonzero(~np.isfinite(values) | (values < low) | (values > high))
        if bad.size:
            ids = table["image_id"].to_numpy(zero_copy_only=False) if ids is None else ids
            row = int(bad[0])
            raise ClickFileError(f"{_where(path, ids[row], _click_index(ids, row), name)}: {values[row]!r} is "
                                 f"outside {low:g}..{high:g} (row {row}; {bad.size} such row(s))")
    return with_empty_image_ids(table, empty_image_ids(raw, path))


def append_clicks(store: str, table: pa.Table) -> str:
    """Add clicks to a click store (a folder or s3:// prefix of Parquet parts) as a new part:
    writers never touch each other's files, so concurrent writers lose nothing."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    uri = storage.join(store, f"part-{stamp}-{secrets.token_hex(4)}.parquet")
    write_click_table(table, uri)
    return uri


def read_click_store(path: str, source: str | None = None) -> pa.Table:
    """Every Parquet part of a click store, as one table (in the parts' order)."""
    parts = [name for name in storage.list_files(path) if name.endswith(".parquet")]
    if not parts:
        raise ClickFileError(f"{path}: a folder without .parquet click tables")
    return concat_click_tables([read_click_table(storage.join(path, name), source) for name in parts])


def load_clicks(path: str, source: str | None = None) -> pa.Table:
    """Read a click file by its suffix: `.json` (What's the Point) or `.parquet`; or a click
    store, a folder (or s3:// prefix) of Parquet parts such as the endpoint's corrections.

    For JSON without a `source`, a file name containing `supp` is `wtp_supp`, anything
    else `wtp_main`.
    """
    name = Path(urlparse(str(path)).path).name  # without an s3:// URI's ?query
    suffix = Path(name).suffix.lower()
    if not suffix:
        try:
            return read_click_store(path, source)
        except FileNotFoundError:
            raise ClickFileError(f"{path}: no such click file or folder") from None
    if suffix == ".json":
        if source is None:
            source = "wtp_supp" if "supp" in name else "wtp_main"
        return read_wtp_json(path, source)
    if suffix in (".parquet", ".pq"):
        return read_click_table(path, source)
    raise ClickFileError(f"{path}: unknown click file type '{suffix}' (expected .json, .parquet or a folder)")


# ---------------------------------------------------------------------------------------
# Checking and using a table.


def validate_clicks(
    table: pa.Table, num_classes: int, image_ids: Iterable[str] | None = None, path: str = "click table"
) -> None:
    """Raise a ClickFileError for a class outside 0..num_classes-1 or an unknown image id."""
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    classes = table["cls"].to_numpy()
    bad = np.flatnonzero((classes < 0) | (classes >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise ClickFileError(
            f"{_where(path, ids[row], _click_index(ids, row), 'cls')}: class {classes[row]} is outside the "
            f"dataset's {num_classes} classes (0..{num_classes - 1}); {bad.size} such click(s)"
        )
    if image_ids is not None:
        unknown = sorted(set(ids.tolist()) - set(image_ids))
        if unknown:
            shown = ", ".join(f"'{i}'" for i in unknown[:5])
            raise ClickFileError(
                f"{path}: {len(unknown)} image id(s) not in the dataset, e.g. {shown} (field 'image_id')"
            )


def clicks_by_image(table: pa.Table) -> dict[str, np.ndarray]:
    """image_id -> float32 [N, 3] (x, y, cls); images listed without clicks map to [0, 3]."""
    result = {i: np.zeros((0, 3), np.float32) for i in empty_image_ids(table)}
    if table.num_rows == 0:
        return result
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    xyc = np.stack(
        [table["x"].to_numpy(), table["y"].to_numpy(), table["cls"].to_numpy().astype(np.float32)], axis=1
    )
    order = np.argsort(ids, kind="stable")  # keeps each image's clicks in file order
    unique, starts = np.unique(ids[order], return_index=True)
    for image_id, chunk in zip(unique, np.split(xyc[order], starts[1:])):
        result[str(image_id)] = chunk
    return result


@dataclass
class ClickFit:
    """What fitting clicks to their image did: the real files have a few stray clicks."""

    clipped: int = 0  # at most 1 px outside: moved onto the border
    dropped: int = 0  # further out: removed

    def __add__(self, other: ClickFit) -> ClickFit:
        return ClickFit(self.clipped + other.clipped, self.dropped + other.dropped)


def fit_clicks_to_image(clicks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ClickFit]:
    """Clip clicks at most 1 px outside [0, W-1] x [0, H-1] onto the image; drop the rest."""
    x, y = clicks[:, 0], clicks[:, 1]
    outside = (x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)
    near = (x >= -1) & (x <= width) & (y >= -1) & (y <= height)
    keep = ~outside | near
    fitted = clicks[keep].copy()
    fitted[:, 0] = np.clip(fitted[:, 0], 0, width - 1)
    fitted[:, 1] = np.clip(fitted[:, 1], 0, height - 1)
    return fitted, ClickFit(clipped=int(np.sum(outside & near)), dropped=int(np.sum(~keep)))


# ---------------------------------------------------------------------------------------
# Simulated clicks.

_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)  # thin diagonal objects (poles) stay one component


def simulate_clicks(
    mask: np.ndarray,
    num_classes: int,
    min_area: int,
    seed: int | Sequence[int],
    ignore_index: int = IGNORE_INDEX,
    classes: Iterable[int] | None = None,
    radius: int = 0,
    per_class: int | None = None,
) -> np.ndarray:
    """One click per connected component per class with at least `min_area` pixels.

    Simulate on the mask at the resolution the images are trained at: a click that is pure
    there stays pure. The click is drawn among the component's most interior pixels
    (distance to its edge at least half the largest, and at least `radius + 1`), so that the
    whole disk of `radius` drawn around it lies on its own class. A component too thin for
    that disk gets **no** click (a disk poking into the neighbours teaches the wrong class
    more than a missing click costs: a third of CamVid's click pixels were off-class before).
    `per_class` is a click budget: only the largest `per_class` components of each class
    get their click, as an annotator clicks the biggest instance first.
    `classes` restricts to some classes (VOC: background only). Deterministic for a seed.
    Returns float32 [N, 3] (x, y, cls) at pixel centres.
    """
    rng = np.random.default_rng(seed)
    wanted = range(num_classes) if classes is None else classes
    present = set(np.unique(mask).tolist()) - {ignore_index}
    clicks = []
    for c in wanted:
        if c not in present:
            continue
        labels, count = ndimage.label(mask == c, structure=_EIGHT_NEIGHBOURS)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        of_class = []
        for component, box in enumerate(ndimage.find_objects(labels), start=1):
            if areas[component] < min_area:
                continue
            # Within the component's bounding box only (fast); the padding makes the
            # image border count as an edge too.
            inside = np.pad(labels[box] == component, 1)
            distance = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
            if distance.max() < radius + 1:
                continue
            rows, cols = np.nonzero(distance >= max(0.5 * distance.max(), radius + 1))
            pick = rng.integers(len(rows))
            of_class.append((areas[component], (box[1].start + cols[pick], box[0].start + rows[pick], c)))
        if per_class is not None:  # stable: equal areas keep their component order
            of_class = sorted(of_class, key=lambda item: -item[0])[:per_class]
        clicks.extend(click for _, click in of_class)
    return np.asarray(clicks, np.float32).reshape(-1, 3)
