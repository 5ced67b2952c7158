"""Label Studio's ML backend, on the segmentation endpoint.

In Label Studio (Project → Settings → Model → Connect model) give the endpoint's address
with this prefix, `http://HOST:8000/label-studio`; Label Studio then calls

    GET  /label-studio/health    {"status": "UP", "model_class": ..., "model_version": ...}
    POST /label-studio/setup     the project's labeling config -> {"model_version": ...}
    POST /label-studio/predict   {"tasks": [...], "label_config": ...} -> {"results": [prediction per task]}
    POST /label-studio/webhook   ANNOTATION_CREATED: its key points become correction clicks

A prediction is one `brushlabels` region per class present, the mask in Label Studio's brush
RLE (`brush_rle`), scored by the network's mean confidence over it. Classes are matched to the
labeling config's `<Label value=...>` by name, ignoring case; model classes the config does not
name are left out, and a config that names none of them is refused (422).

Task images: an http(s) URL, an `s3://` URI (read with the project's storage), or a path of
Label Studio's own (`/data/upload/...`, `/data/local-files/?d=...`), fetched from
`serving.label_studio_url` with the key in `LABEL_STUDIO_API_KEY` (from the replica's
environment; only sent to that address): a personal access token (a JWT) as `Bearer`, a
legacy token as `Token`, as Label Studio's SDK sends them.

Key points (`<KeyPointLabels>`) in a created annotation are stored, like POST /v1/clicks, in
`serving.clicks_store` (source `user`) for the next `seminar train`; the image id is the task
image's file stem, without the 8-hex-digit prefix Label Studio gives uploads, so that it names
the photo in the training folder. Updated annotations are not collected (the store is
append-only: an update would add its clicks a second time).

Label Studio's request and answer shapes follow its ML backend SDK (label-studio-ml-backend,
`label_studio_ml/api.py`); the brush RLE is checked byte for byte against label-studio-sdk's
own encoder (tests/data/label_studio_rle.json).
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import os
import socket
import re
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from seminar import storage
from seminar.untrusted import UntrustedJSONError, parse_json
from serving.imaging import MAX_CLICKS_PER_REQUEST, InputError

PREFIX = "/label-studio"
ROUTES = tuple(f"{PREFIX}/{name}" for name in ("health", "setup", "predict", "webhook"))
MAX_BODY_BYTES = 16 * 2**20  # a /predict or /webhook body: tasks, the labeling config, an annotation
API_KEY_ENV = "LABEL_STUDIO_API_KEY"
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio renames uploads to "<8 hex>-<name>"

# Label Studio's brush RLE: a 32-bit value count, the word size less one (5 bits), four
# run-length field widths less one (4 bits each), then per run of equal values either
# "0" + 5 bits of zeros + the value (a run of one) or "1" + the width's index (2 bits) +
# (length - 1) + the value, runs longer than 2**16 split; zero-padded to whole bytes.
RLE_WIDTHS = (3, 4, 8, 16)
WORD_BITS = 8


def brush_rle(mask: np.ndarray) -> list[int]:
    """A boolean [H, W] mask as Label Studio's brush RLE of its RGBA picture (255 where set, 4
    channels each), as label-studio-sdk's `mask2rle` writes it."""
    values = np.repeat(np.where(mask.ravel(), 255, 0).astype(np.uint8), 4)
    bits = [f"{values.size:032b}", f"{WORD_BITS - 1:05b}", *(f"{w - 1:04b}" for w in RLE_WIDTHS)]
    if values.size:
        ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
        lengths = np.diff(np.append(-1, ends))
        for length, value in zip(lengths.tolist(), values[ends].tolist()):
            word = f"{value:08b}"
            if length == 1:
                bits.append("0" + "00" + "000" + word)
                continue
            index = next((i for i, w in enumerate(RLE_WIDTHS) if length <= 2**w), len(RLE_WIDTHS) - 1)
            while length > 2**16:  # as the reference writes it: full chunks, then the rest, all 16-bit
                bits.append("1" + "11" + f"{2**16 - 1:016b}" + word)
                length -= 2**16
            bits.append(f"1{index:02b}{length - 1:0{RLE_WIDTHS[index]}b}" + word)
    stream = "".join(bits)
    stream += "0" * (8 - len(stream) % 8)  # always padded, a whole zero byte when already aligned
    return list(np.packbits(np.frombuffer(stream.encode(), np.uint8) - ord("0")).tolist())


# ---- the labeling config ---------------------------------------------------------------


@dataclass
class LabelingConfig:
    """What a project's labeling config says this backend needs."""

    image_key: str  # task["data"][image_key] holds the image
    image_name: str  # the <Image> tag's name (results' to_name)
    brush_name: str  # the <BrushLabels> tag's name (results' from_name)
    class_labels: dict[int, str]  # model class id -> the config's label for it


def _parse_config(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise InputError(422, "invalid_label_config", f"label_config: not XML ({e})") from None


def _image_keys(root: ET.Element) -> dict[str, str]:
    """<Image name="photo" value="$image"> tags as {"photo": "image"}: where each takes its image in a task's data."""
    return {t.get("name"): t.get("value")[1:] for t in root.iter("Image") if t.get("value", "").startswith("$")}


def labeling_config(xml: str, classes: tuple[str, ...] | list[str]) -> LabelingConfig:
    """Parse a labeling config; InputError 422 naming what is missing."""
    root = _parse_config(xml)
    brush = next(root.iter("BrushLabels"), None)
    if brush is None:
        raise InputError(422, "invalid_label_config", "label_config: no <BrushLabels> tag (this backend answers "
                                                      "with brush masks)")
    to_name = brush.get("toName", "")
    image_key = _image_keys(root).get(to_name)
    if image_key is None:
        raise InputError(422, "invalid_label_config", f"label_config: <BrushLabels toName=\"{to_name}\"> names no "
                                                      f"<Image> with value=\"$key\"")
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    labels = [label.get("value", "") for label in brush.iter("Label")]
    class_labels = {by_name[v.lower()]: v for v in labels if v.lower() in by_name}
    if not class_labels:
        raise InputError(422, "invalid_label_config", f"label_config: none of the labels {labels[:10]} is one of "
                                                      f"the model's classes {list(classes)}")
    return LabelingConfig(image_key, to_name, brush.get("name", ""), class_labels)


# ---- task images -------------------------------------------------------------------------


def task_image(task: dict, key: str, where: str) -> str:
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise InputError(422, "invalid_task", f"{where}.data.{key}: missing (the labeling config's <Image> "
                                              f"takes its image from ${key})")
    return value


def fetch_image(ref: str, label_studio_url: str | None, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes of a task's image; InputError 422 naming the image when it cannot be had."""
    if storage.is_s3(ref):
        try:
            data = storage.read_bytes(ref)
        except (OSError, ValueError) as e:
            raise InputError(422, "image_unreachable", f"{ref}: {e}") from None
    else:
        url, headers = ref, {}
        if not urllib.parse.urlsplit(ref).scheme:  # one of Label Studio's own paths
            if not label_studio_url:
                raise InputError(422, "image_unreachable", f"{ref}: a Label Studio path, and serving.label_studio_url "
                                                           f"is not set")
            url = urllib.parse.urljoin(label_studio_url.rstrip("/") + "/", ref.lstrip("/"))
        elif urllib.parse.urlsplit(ref).scheme not in ("http", "https"):
            raise InputError(422, "image_unreachable", f"{ref}: not an http(s) URL, s3:// URI or Label Studio path")
        check_image_host(url, label_studio_url)
        request = urllib.request.Request(url, headers=headers)
        key = os.environ.get(API_KEY_ENV)
        if key and _is_label_studio(url, label_studio_url):
            # as Label Studio's SDK does: a personal access token (a JWT) as Bearer, a legacy token as
            # Token; never carried along a redirect to another host
            request.add_unredirected_header("Authorization", f"{'Bearer' if key.count('.') == 2 else 'Token'} {key}")
        try:
            opener = urllib.request.build_opener(_CheckedRedirects(label_studio_url), _PublicOnly(label_studio_url))
            with opener.open(request, timeout=timeout_s) as answer:
                data = answer.read(max_bytes + 1)
        except urllib.error.HTTPError as e:  # the status alone: the other side's words are not repeated
            raise InputError(422, "image_unreachable", f"{url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise InputError(422, "image_unreachable", f"{url}: {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise InputError(413, "image_too_large", f"{ref}: larger than {max_bytes} bytes")
    return data


def _is_label_studio(url: str, label_studio_url: str | None) -> bool:
    return bool(label_studio_url) and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(label_studio_url).netloc


def check_image_host(url: str, label_studio_url: str | None) -> None:
    """A task image URL must name a public host, or Label Studio's own (`serving.label_studio_url`):
    a task is anyone's text, and a URL to loopback, link-local or private addresses would make
    the endpoint probe the services beside it. (The address actually connected to is checked
    again: `_PublicOnly`.)"""
    if _is_label_studio(url, label_studio_url):
        return
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        found = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError):
        raise InputError(422, "image_unreachable", f"{url}: host {host!r} not found") from None
    for *_, address in found:
        _check_address(url, host, address[0])


def _check_address(url: str, host: str, address: str) -> None:
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        raise InputError(422, "image_refused", f"{url}: {host} is not a public address ({ip}); task images come "
                                               f"from public hosts or serving.label_studio_url")


class _PublicOnly(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """Connections whose peer address is checked once connected, before a byte is sent: a name
    that resolved to a public address for `check_image_host` and to a private one for the
    connection (DNS rebinding) is refused too. Label Studio's own host is exempt."""

    def __init__(self, label_studio_url: str | None):
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.label_studio_url = label_studio_url

    def _checked(self, base: type, req: urllib.request.Request):
        url, exempt = req.full_url, _is_label_studio(req.full_url, self.label_studio_url)

        def connection(host, **kwargs):
            conn = base(host, **kwargs)
            connect = conn.connect

            def checked_connect():
                connect()
                if not exempt:
                    try:
                        _check_address(url, conn.host, conn.sock.getpeername()[0])
                    except InputError:
                        conn.close()
                        raise
            conn.connect = checked_connect
            return conn
        return connection

    def http_open(self, req):
        return self.do_open(self._checked(http.client.HTTPConnection, req), req)

    def https_open(self, req):
        return self.do_open(self._checked(http.client.HTTPSConnection, req), req,
                            context=self._context)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only to hosts a task image may name."""

    def __init__(self, label_studio_url: str | None):
        self.label_studio_url = label_studio_url

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_image_host(newurl, self.label_studio_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def image_id(ref: str) -> str:
    """The training image id a task image names: its file stem, without Label Studio's upload prefix."""
    parts = urllib.parse.urlsplit(ref)
    path = urllib.parse.parse_qs(parts.query).get("d", [parts.path])[0]  # /data/local-files/?d=dir/x.jpg
    return UPLOAD_PREFIX.sub("", PurePosixPath(urllib.parse.unquote(path)).stem)


# ---- answers -------------------------------------------------------------------------------


def prediction(labels: np.ndarray, confidence: np.ndarray, config: LabelingConfig, model_version: str) -> dict:
    """One task's prediction: a brushlabels region per class present that the config names."""
    height, width = labels.shape
    result = []
    for cls, label in sorted(config.class_labels.items()):
        mask = labels == cls
        if not mask.any():
            continue
        result.append({
            "id": f"seminar-{cls}", "type": "brushlabels", "from_name": config.brush_name,
            "to_name": config.image_name, "original_width": width, "original_height": height,
            "image_rotation": 0, "score": float(confidence[mask].mean()),
            "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]},
        })
    return {"result": result, "score": float(confidence.mean()), "model_version": model_version}


def annotation_clicks(payload: dict, classes: tuple[str, ...] | list[str]) -> tuple[str, list[tuple[float, float, int]]]:
    """(image id, [(x, y, class)] in image pixels) of a webhook's annotation's key points."""
    task, annotation = payload.get("task"), payload.get("annotation")
    if not isinstance(task, dict) or not isinstance(annotation, dict):
        raise InputError(422, "invalid_webhook", "body: needs 'task' and 'annotation' objects (Label Studio "
                                                 "sends them with ANNOTATION_CREATED)")
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    results = annotation.get("result") or []
    if not isinstance(results, list):
        raise InputError(422, "invalid_webhook", "annotation.result: a list of regions expected")
    points = sum(1 for region in results if isinstance(region, dict) and region.get("type") == "keypointlabels")
    if points > MAX_CLICKS_PER_REQUEST:
        raise InputError(413, "too_many_clicks", f"annotation.result: {points} key points; at most "
                                                 f"{MAX_CLICKS_PER_REQUEST} a request, as POST /v1/clicks takes")
    clicks, names = [], set()
    for n, region in enumerate(results):
        where = f"annotation.result.{n}"
        if not isinstance(region, dict) or region.get("type") != "keypointlabels":
            continue
        value = region.get("value") or {}
        try:
            x, y = float(value["x"]), float(value["y"])
            width, height = int(region["original_width"]), int(region["original_height"])
            (label,) = value["keypointlabels"]
            label, to_name = label.lower(), str(region.get("to_name", ""))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise InputError(422, "invalid_webhook", f"{where}: needs value.x, value.y, value.keypointlabels "
                                                     f"(one label), original_width and original_height") from None
        if label not in by_name:
            raise InputError(422, "invalid_webhook", f"{where}.value.keypointlabels: '{value['keypointlabels'][0]}' is "
                                                     f"not one of the model's classes {list(classes)}")
        if not 0 < width <= 65535 or not 0 < height <= 65535:
            raise InputError(422, "invalid_webhook", f"{where}: an image of {width}x{height} pixels")
        if not (0 <= x <= 100 and 0 <= y <= 100):
            raise InputError(422, "invalid_webhook", f"{where}.value: ({x:g}%, {y:g}%) is outside the image")
        # Label Studio gives percentages of the image's width and height
        clicks.append((min(x * width / 100, width - 1), min(y * height / 100, height - 1), by_name[label]))
        names.add(to_name)
    if not clicks:
        return "", []
    return image_id(_annotated_image(task, names.pop(), payload.get("project"))), clicks


def _annotated_image(task: dict, to_name: str, project) -> str:
    """The task image the key points were put on: named by the project's labeling config (Label
    Studio sends the project with its webhooks), else the data key named as the image tag, else
    the task's only value."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    key = to_name if to_name in data else (next(iter(data)) if len(data) == 1 else None)
    xml = project.get("label_config") if isinstance(project, dict) else None
    if isinstance(xml, str):
        try:
            key = _image_keys(_parse_config(xml)).get(to_name, key)
        except InputError:  # a config we cannot read: the fallbacks above
            pass
    if key is None or not isinstance(data.get(key), str):
        raise InputError(422, "invalid_webhook", f"task.data: which value holds the image '{to_name}' is not known "
                                                 f"(send the project with the webhook, or name the data key as the "
                                                 f"image tag)")
    return data[key]


def add_routes(app, service) -> None:
    """Label Studio's ML backend routes on the endpoint's FastAPI app (service: SegmentationService)."""

    async def body(request: Request) -> dict:
        data = await service.receive(request, MAX_BODY_BYTES, json_body=True)
        try:
            payload = parse_json(data, "body")
        except UntrustedJSONError as e:
            raise InputError(400, "invalid_json", str(e)) from None
        if not isinstance(payload, dict):
            raise InputError(400, "invalid_json", "body: a JSON object expected")
        return payload

    def config_of(payload: dict, field: str) -> LabelingConfig:
        xml = payload.get(field)
        if not isinstance(xml, str):
            raise InputError(422, "invalid_label_config", f"{field}: missing (the project's labeling config)")
        return labeling_config(xml, service.segmenter.classes)

    @app.get(f"{PREFIX}/health")
    @app.get(f"{PREFIX}/")
    async def health() -> dict:
        return {"status": "UP", "model_class": "seminar", "model_version": service.version}

    @app.post(f"{PREFIX}/setup")
    async def setup(request: Request) -> dict:
        config_of(await body(request), "schema")  # refuse a config this model cannot answer now, not per task
        return {"model_version": service.version}

    @app.post(f"{PREFIX}/predict")
    async def predict(request: Request) -> dict:
        payload = await body(request)
        config = config_of(payload, "label_config")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list):
            raise InputError(422, "invalid_task", "tasks: a list of Label Studio tasks expected")
        cfg = service.cfg

        async def one(n: int, task: dict) -> dict:
            ref = task_image(task, config.image_key, f"tasks.{n}")
            data = await asyncio.to_thread(fetch_image, ref, cfg.label_studio_url, cfg.max_bytes, cfg.body_timeout_s)
            labels, confidence = await service.labels(data)
            return await asyncio.to_thread(prediction, labels, confidence, config, service.version)

        results = []
        for start in range(0, len(tasks), cfg.max_batch_size):  # a batch at a time: bounded memory
            results += await asyncio.gather(*(one(start + i, t) for i, t in enumerate(tasks[start:start + cfg.max_batch_size])))
        return {"results": results, "model_version": service.version}

    @app.post(f"{PREFIX}/webhook")
    async def webhook(request: Request) -> JSONResponse:
        payload = await body(request)
        if payload.get("action") != "ANNOTATION_CREATED":
            return JSONResponse({"ignored": str(payload.get("action"))}, status_code=200)
        if not service.cfg.clicks_store:
            raise InputError(404, "clicks_not_collected", "this endpoint does not collect clicks "
                                                          "(serving.clicks_store is not set)")
        image, clicks = annotation_clicks(payload, service.segmenter.classes)
        part = await asyncio.to_thread(service.write_clicks, image, clicks) if clicks else None
        return JSONResponse({"stored": len(clicks), "part": part}, status_code=201)
