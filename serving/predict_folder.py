"""`seminar predict MODEL INPUT --out OUTPUT`: segment a folder of images, and say where to click next.

    seminar predict runs/camvid/my-run photos/ --out predictions/
    seminar predict models/seminar/3 s3://bucket/photos --out s3://bucket/predictions

For every JPEG or PNG directly in INPUT (a folder or an s3:// prefix) it writes
`OUTPUT/<stem>.png`, a palette PNG whose pixel values are class ids, and at the end one table
for the run, `OUTPUT/predictions.parquet` (a row per image, columns in `TABLE_SCHEMA`).

Where to click next (`serving.committee`): the students' teachers each segment the image, and
where they disagree is where a click teaches most; the table has each image's mean
disagreement and its suggested clicks. The label map itself is the served network's.

Resumable: each label map carries its table row (a PNG text chunk), written at once, so a run
that stops is restarted with the same command and skips the images already done.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seminar import storage
from seminar.predict import Segmenter, restore_size
from serving.committee import Committee, suggested_clicks
from serving.imaging import InputError, decode_image, label_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TABLE = "predictions.parquet"
ROW_CHUNK = "seminar-row"  # the PNG text chunk holding the image's table row

CLASS_TYPE = pa.struct([("id", pa.int32()), ("name", pa.string()), ("share", pa.float32()),
                        ("confidence", pa.float32())])
CLICK_TYPE = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("score", pa.float32())])
TABLE_SCHEMA = pa.schema([
    ("image", pa.string()),  # the input file's name
    ("label_map", pa.string()),  # the PNG written for it, in OUTPUT
    ("width", pa.int32()), ("height", pa.int32()),
    ("model_version", pa.string()), ("which", pa.string()),
    ("classes", pa.list_(CLASS_TYPE)),  # classes present: pixel share, mean confidence
    ("mean_confidence", pa.float32()),
    ("disagreement", pa.float32()),  # mean over the image, in [0, 1]; null without a committee
    ("suggested_clicks", pa.list_(CLICK_TYPE)),  # original pixels, best first
])


class PredictError(ValueError):
    pass


def image_row(name: str, label_map: str, labels: np.ndarray, confidence: np.ndarray,
              disagreement: np.ndarray | None, segmenter: Segmenter, suggestions: int) -> dict:
    height, width = labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(segmenter.classes))
    sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=len(segmenter.classes))
    classes = [{"id": c, "name": segmenter.classes[c], "share": float(counts[c] / labels.size),
                "confidence": float(sums[c] / counts[c])} for c in np.flatnonzero(counts).tolist()]
    clicks = [] if disagreement is None else suggested_clicks(disagreement, suggestions, width, height)
    return {"image": name, "label_map": label_map, "width": width, "height": height,
            "model_version": segmenter.version, "which": segmenter.which, "classes": classes,
            "mean_confidence": float(confidence.mean()),
            "disagreement": None if disagreement is None else float(disagreement.mean()),
            "suggested_clicks": clicks}


def done_row(uri: str, version: str) -> dict | None:
    """The row of a label map written earlier for the same model version, else None."""
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(uri)))
        row = json.loads(image.text[ROW_CHUNK])
    except (OSError, KeyError, ValueError):  # missing, cut short, or not ours: redo it
        return None
    return row if row.get("model_version") == version else None


def input_images(input_uri: str) -> list[str]:
    try:
        names = [n for n in storage.list_files(input_uri) if n.lower().endswith(IMAGE_SUFFIXES)]
    except FileNotFoundError as e:
        raise PredictError(str(e)) from None
    if not names:
        raise PredictError(f"{input_uri}: no .jpg, .jpeg or .png files in it")
    stems: dict[str, str] = {}
    for name in names:
        stem = Path(name).stem
        if stem in stems:
            raise PredictError(f"{input_uri}: {stems[stem]} and {name} would both be written as {stem}.png; "
                               f"rename one")
        stems[stem] = name
    return names


def predict_folder(committee: Committee, input_uri: str, output_uri: str, batch_size: int = 4,
                   suggestions: int = 5, max_pixels: int = 16 * 2**20, progress=None) -> dict:
    """Segment every image of input_uri into output_uri; returns a summary (counts, table path).
    `progress(total)` makes a progress bar (`update(n)`) for the images left to do."""
    if storage.filesystem(output_uri)[1] == storage.filesystem(input_uri)[1]:
        raise PredictError("--out must differ from INPUT: the label maps would land among the images")
    segmenter = committee.served
    names = input_images(input_uri)
    rows, todo, failed = {}, [], []
    for name in names:
        row = done_row(storage.join(output_uri, f"{Path(name).stem}.png"), segmenter.version)
        if row is None:
            todo.append(name)
        else:
            rows[name] = row
    skipped = len(rows)
    bar = progress(len(todo)) if progress is not None else None
    for start in range(0, len(todo), batch_size):
        batch, images, tensors = [], [], []
        for name in todo[start:start + batch_size]:
            try:
                image = decode_image(storage.read_bytes(storage.join(input_uri, name)), max_pixels)
            except InputError as e:  # one bad file does not stop the others; it is listed
                failed.append(f"{name}: {e.detail}")
                continue
            batch.append(name)
            images.append(image)
            tensors.append(segmenter.model_input(image))
        if not tensors:
            continue
        for name, image, (probs, disagreement) in zip(batch, images, committee(tensors)):
            height, width = image.shape[:2]
            labels, confidence = restore_size(probs, height, width)
            label_map = f"{Path(name).stem}.png"
            row = image_row(name, label_map, labels, confidence,
                            None if disagreement is None else disagreement.numpy(), segmenter, suggestions)
            storage.write_bytes(storage.join(output_uri, label_map), label_png(labels, segmenter.palette, {ROW_CHUNK: json.dumps(row)}))
            rows[name] = row
        if bar is not None:
            bar.update(len(todo[start:start + batch_size]))
    table = pa.Table.from_pylist([rows[n] for n in names if n in rows], schema=TABLE_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(output_uri, TABLE), sink.getvalue())
    return {"images": len(names), "written": len(rows) - skipped, "skipped": skipped, "failed": failed,
            "table": storage.join(output_uri, TABLE), "committee": len(committee.members)}
