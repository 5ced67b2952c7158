"""Bytes in, bytes out: checking and decoding uploads, and encoding the three answers.

Everything here is plain numpy and Pillow (no Ray, no torch), so it runs in a thread
off the replica's event loop and is unit-tested on its own.

Input checks, in the order the endpoint applies them (each failure is an `InputError`
carrying its HTTP status and a reason):

    declared Content-Type not JPEG/PNG/octet-stream/multipart  -> 415
    body larger than max_bytes                                 -> 413
    empty body                                                 -> 400
    bytes that are an image, but not JPEG or PNG (GIF, BMP...)  -> 415
    bytes that are no image at all, or a truncated one         -> 400
    width x height larger than max_pixels (read from the header,
    before any pixel is decoded: no decompression bombs)       -> 413
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

# Declared types we accept for a raw body; the bytes are sniffed whatever is declared.
ACCEPTED_CONTENT_TYPES = ("image/jpeg", "image/jpg", "image/pjpeg", "image/png", "application/octet-stream")
SUPPORTED_FORMATS = ("JPEG", "PNG")
MAX_CLICKS_PER_REQUEST = 1000  # one POST /v1/clicks, or one Label Studio annotation through the webhook

# How the JSON answer's masks are run-length encoded (also stated in every JSON answer).
RLE_CONVENTION = (
    "COCO uncompressed RLE: the class mask (height x width) is flattened column-major "
    "(Fortran order: down the first column, then the next); counts alternate runs of 0 and 1 "
    "and start with a run of 0 (which may be 0 long); size is [height, width]. "
    "pycocotools.mask.frPyObjects(rle, h, w) reads it."
)


@dataclass
class InputError(Exception):
    """A request the endpoint refuses: HTTP status, a short error code and a reason."""

    status: int
    error: str
    detail: str
    retry_after_s: float | None = None  # sent as Retry-After (a 503 the client should retry)

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"


def mime_type(content_type: str | None) -> str:
    """'image/png; charset=x' -> 'image/png' (lower case, '' when absent)."""
    return (content_type or "").split(";")[0].strip().lower()


def check_declared_type(content_type: str | None) -> None:
    declared = mime_type(content_type)
    if declared and declared not in ACCEPTED_CONTENT_TYPES:
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {declared!r} is not accepted; send a JPEG or PNG image "
                         "(image/jpeg, image/png) as the body or as a multipart/form-data file field")


def check_size(num_bytes: int, max_bytes: int) -> None:
    if num_bytes > max_bytes:
        raise InputError(413, "payload_too_large",
                         f"the image is {num_bytes} bytes (or more); the limit is {max_bytes} bytes")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 [H, W, 3] RGB, upright (EXIF orientation applied)."""
    if not data:
        raise InputError(400, "empty_body", "the request carries no image: send a JPEG or PNG "
                                            "as the body or as a multipart/form-data file field")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above ours by default
        raise InputError(413, "too_many_pixels", f"the image has more pixels than Pillow decodes safely; "
                                                 f"the limit here is {max_pixels}") from None
    except UnidentifiedImageError:
        raise InputError(400, "undecodable_image", "the body is not a readable image "
                                                   "(expected JPEG or PNG bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short ("Truncated File Read")
        raise InputError(400, "undecodable_image", f"the image header cannot be read: {e}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise InputError(415, "unsupported_media_type",
                         f"{image.format} images are not supported; send JPEG or PNG")
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(413, "too_many_pixels",
                         f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise InputError(400, "undecodable_image", f"the image is empty ({width}x{height})")
    try:
        image.load()
        # Browsers show JPEGs turned by their EXIF orientation: segment what the user sees.
        image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise InputError(400, "undecodable_image", f"the {image.format} data cannot be decoded: {e}") from None
    return np.asarray(rgb, dtype=np.uint8)


def _flat_palette(palette: list[tuple[int, int, int]]) -> list[int]:
    flat = [channel for colour in palette for channel in colour]
    return flat + [0] * (768 - len(flat))


def encode_png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes; `text` goes into tEXt chunks."""
    out = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    # Level 1: a label map compresses well anyway, and encoding sits on the request's path.
    image.save(out, format="PNG", compress_level=1, pnginfo=info)
    return out.getvalue()


def label_png(labels: np.ndarray, palette: list[tuple[int, int, int]], text: dict[str, str] | None = None) -> bytes:
    """uint8 [H, W] class ids -> a palette PNG (mode "P"): pixel value = class id."""
    image = Image.fromarray(labels)  # mode "L"
    image.putpalette(_flat_palette(palette))  # "L" + palette -> "P", values unchanged
    return encode_png(image, text)


def overlay_png(image: np.ndarray, labels: np.ndarray, palette: list[tuple[int, int, int]],
                alpha: float, untinted: tuple[int, ...] = ()) -> bytes:
    """The image with each class painted in its palette colour at opacity alpha.

    Classes in `untinted` (background) are left as they are, so the photo stays visible.
    """
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    if untinted:
        keep = np.isin(labels, untinted)
        blended[keep] = image[keep]
    return encode_png(Image.fromarray(blended.round().astype(np.uint8)))


def rle_column_major(mask: np.ndarray) -> list[int]:
    """Boolean [H, W] -> COCO uncompressed RLE counts (see RLE_CONVENTION)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # runs start with zeros
    return counts


def rle_decode_column_major(counts: list[int], height: int, width: int) -> np.ndarray:
    """The inverse of rle_column_major (for clients and tests)."""
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")


def segmentation_json(labels: np.ndarray, confidence: np.ndarray, classes: list[str],
                      palette: list[tuple[int, int, int]], version: str) -> dict:
    """The JSON answer: every class present, its RLE mask, pixel count and mean confidence."""
    height, width = labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    confidence_sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=len(classes))
    present = []
    for class_id in np.flatnonzero(counts).tolist():
        present.append({
            "id": class_id,
            "name": classes[class_id],
            "color": list(palette[class_id]),
            "pixels": int(counts[class_id]),
            "fraction": float(counts[class_id] / labels.size),
            "mean_confidence": float(confidence_sums[class_id] / counts[class_id]),
            "rle": {"size": [height, width], "counts": rle_column_major(labels == class_id)},
        })
    return {
        "model_version": version,
        "width": width,
        "height": height,
        "mean_confidence": float(confidence.mean()),
        "rle_format": RLE_CONVENTION,
        "classes": present,
    }
