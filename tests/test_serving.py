"""The segmentation endpoint on a real Ray Serve app, over loopback HTTP.

One application for the whole module, on the session's Ray cluster, serving an untrained
DeepLabV3+ checkpoint (written by the training code's own checkpoint writer) through a
model registry name - so the registry lookup is exercised too. Images are small
(infer_size 64) to keep the module well under a minute of serving on 2 cores.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import file_server, free_port, wait_for_port, wait_serve_gone, wait_until
from test_serving_units import encode, make_checkpoint

INFER_SIZE = 64
MAX_BYTES = 100_000
MAX_PIXELS = 400_000
BODY_TIMEOUT_S = 3.0


def synthetic_image(index: int, height: int = 64, width: int = 64) -> np.ndarray:
    from seminar.data.datasets import render_synthetic

    image, _ = render_synthetic(np.random.default_rng([7, index]), max(height, width), 4)
    return np.ascontiguousarray(image[:height, :width])


@pytest.fixture(scope="module")
def registry_model(tmp_path_factory):
    """(registry name to serve, local checkpoint) - the checkpoint published as version 1."""
    from seminar.registry import ModelRegistry

    root = tmp_path_factory.mktemp("serving")
    checkpoint = make_checkpoint(root / "checkpoint", model="deeplabv3plus_resnet18")
    registry = root / "registry"
    ModelRegistry(str(registry)).publish(str(checkpoint), "shapes")
    return f"{registry}/shapes", checkpoint


@pytest.fixture(scope="module")
def segmenter(registry_model):
    import torch

    from seminar.predict import Segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replica: same kernels, same sums
    yield Segmenter.load(str(registry_model[1]), runtime="onnx", threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(ray_session, registry_model):
    """Base URL of the app; Serve is shut down when the module ends."""
    from ray import serve

    from seminar.config import ServingConfig
    from serving.app import ServeArgs, build_app

    wait_serve_gone()  # one Serve per cluster: another test's instance must be gone first
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serving = ServingConfig(infer_size=INFER_SIZE, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS,
                                num_replicas=1, max_batch_size=8, batch_pixel_budget=8 * 64 * 64,
                                max_ongoing_requests=16, max_queued_requests=32, torch_threads=1,
                                body_timeout_s=BODY_TIMEOUT_S, max_slow_uploads=8)
        serve.run(build_app(ServeArgs(model=registry_model[0], serving=serving)), name="seminar-test",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        wait_serve_gone()


@pytest.fixture(scope="module")
def clicks_store(tmp_path_factory) -> Path:
    """Where the committee app stores correction clicks (serving.clicks_store)."""
    return tmp_path_factory.mktemp("clicks") / "store"


LABEL_STUDIO_IMAGE = "/data/upload/3/0a1b2c3d-street_07.png"  # as Label Studio names an upload


@pytest.fixture(scope="module")
def label_studio_files():
    """Label Studio's file server, as far as the ML backend sees it: (base URL, the image's bytes)."""
    image = encode(synthetic_image(7, height=48, width=64))
    with file_server({LABEL_STUDIO_IMAGE: image}) as (url, _):
        yield url, image


@pytest.fixture(scope="module")
def committee_server(server, clicks_store, label_studio_files, tmp_path_factory):
    """A second app on the same Serve: two students whose teachers are each sure of a different
    class (1 and 2, by their classifier biases), serving.suggest_clicks=3."""
    import torch
    from ray import serve

    from seminar.config import ServingConfig, load_spec
    from seminar.engine import write_initial_checkpoint
    from serving.app import ServeArgs, build_app

    students = ", ".join(f"{{model: deeplabv3plus_mobilenetv2, decoder_channels: 32, seed: {k}}}" for k in (0, 1))
    cfg = load_spec(None, ["storage.run_name=committee-test", f"students=[{students}]", "data.synthetic.image_size=64"])
    checkpoint = write_initial_checkpoint(str(tmp_path_factory.mktemp("committee") / "checkpoint"), cfg)
    for k in (0, 1):
        path = Path(checkpoint) / f"student_{k}" / "teacher.pt"
        weights = torch.load(path, weights_only=True)
        weights["classifier.bias"][k + 1] += 10.0
        torch.save(weights, path)
    # eager PyTorch here (the other app runs ONNX Runtime): both runtimes behind the endpoint
    serving = ServingConfig(infer_size=INFER_SIZE, num_replicas=1, torch_threads=1, suggest_clicks=3,
                            batch_pixel_budget=8 * 64 * 64, clicks_store=str(clicks_store), runtime="torch",
                            label_studio_url=label_studio_files[0])
    serve.run(build_app(ServeArgs(model=checkpoint, which="teacher_ensemble", serving=serving)),
              name="committee-test", route_prefix="/committee")
    yield f"{server}/committee"
    serve.delete("committee-test")


def post_clicks(url: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/clicks", data=data, headers={"Content-Type": content_type}, timeout=30)


def test_correction_clicks_are_stored_for_the_next_run(committee_server, server, clicks_store):
    from seminar.data.clicks import load_clicks

    def stored_rows() -> int:  # the store is the module's: other tests may have stored clicks first
        return load_clicks(str(clicks_store)).num_rows if clicks_store.exists() else 0

    before = stored_rows()
    body = {"image_id": "street_01", "width": 64, "height": 48, "clicks": [{"x": 3, "y": 4, "cls": 2},
                                                                           {"x": 63, "y": 47.0, "cls": 0}]}
    stored = post_clicks(committee_server, body)
    assert stored.status_code == 201 and stored.json()["stored"] == 2, stored.text
    # concurrent writers: every click lands
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post_clicks(committee_server, {**body, "image_id": f"img_{i}"}), range(16)))
    assert [a.status_code for a in answers] == [201] * 16
    table = load_clicks(str(clicks_store))
    rows = [r for r in table.to_pylist() if r["image_id"] == "street_01"]
    assert table.num_rows == before + 34 and {(r["x"], r["y"], r["cls"], r["source"]) for r in rows} == {
        (3.0, 4.0, 2, "user"), (63.0, 47.0, 0, "user")}
    # refused: named field, 4xx, nothing stored
    for bad, status, words in [
        ({**body, "clicks": [{"x": 3, "y": 4, "cls": 4}]}, 422, "clicks.0.cls: 4 is outside the model's 4 classes"),
        ({**body, "clicks": [{"x": 64, "y": 4, "cls": 1}]}, 422, "clicks.0: (64, 4) is outside the 64x48 image"),
        ({**body, "clicks": [{"x": -1, "y": 4, "cls": 1}]}, 422, "clicks.0.x"),
        ({**body, "image_id": "../etc"}, 422, "image_id"),
        ({**body, "clicks": []}, 422, "clicks"),
        ({**body, "extra": 1}, 422, "extra"),
        (b'{"image_id": "a", "width": 3', 422, "invalid_click"),
        (b"\xff\xfe", 422, "invalid_click"),
    ]:
        refused = post_clicks(committee_server, bad)
        assert refused.status_code == status and words in refused.text, (bad, refused.text)
    assert post_clicks(committee_server, body, "text/plain").status_code == 415
    assert stored_rows() == before + 34
    not_collected = post_clicks(server, body)
    assert not_collected.status_code == 404 and not_collected.json()["error"] == "clicks_not_collected"
    assert requests.get(f"{committee_server}/v1/model", timeout=30).json()["clicks"] == {"collected": True}


def test_label_studio_backend_round_trip(committee_server, label_studio_files, clicks_store):
    """Label Studio's calls as its ML backend SDK makes them: health, setup, predict (brush
    masks equal to the endpoint's own label map), webhook (key points stored as clicks)."""
    from seminar.data.clicks import load_clicks
    from serving.label_studio import brush_rle

    base, (files_url, image) = f"{committee_server}/label-studio", label_studio_files
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
              '<Label value="Disk_1"/><Label value="square_2"/><Label value="Road"/></BrushLabels>'
              '<KeyPointLabels name="kp" toName="image"><Label value="disk_1"/></KeyPointLabels></View>')
    health = requests.get(f"{base}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    version = health.json()["model_version"]
    setup = requests.post(f"{base}/setup", json={"project": "3.1700000000", "schema": config, "hostname": files_url,
                                                 "access_token": ""}, timeout=30)
    assert setup.status_code == 200 and setup.json() == {"model_version": version}

    tasks = [{"id": 1, "data": {"image": LABEL_STUDIO_IMAGE}},  # Label Studio's path: from label_studio_url
             {"id": 2, "data": {"image": files_url + LABEL_STUDIO_IMAGE}}]
    answer = requests.post(f"{base}/predict", json={"tasks": tasks, "label_config": config, "project": "3.1",
                                                    "params": {"context": None}}, timeout=60)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["results"]
    assert first == second and first["model_version"] == version and 0 < first["score"] <= 1
    labels = np.array(Image.open(io.BytesIO(post_image(committee_server, image).content)))
    regions = {r["value"]["brushlabels"][0]: r for r in first["result"]}
    assert set(regions) == {"Disk_1", "square_2"}  # the teachers' ensemble: classes 1 and 2
    for cls, name in [(1, "Disk_1"), (2, "square_2")]:
        region = regions[name]
        assert region["value"]["rle"] == brush_rle(labels == cls)
        assert (region["original_width"], region["original_height"], region["from_name"], region["to_name"]) == (
            64, 48, "tag", "image")

    def post(route, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(f"{base}/{route}", data=data, headers={"Content-Type": "application/json"}, timeout=30)

    for route, body, status, words in [
        ("predict", {"tasks": [{"id": 9, "data": {"image": "/data/upload/3/gone.png"}}], "label_config": config},
         422, "/data/upload/3/gone.png: HTTP 404"),
        ("predict", {"tasks": [{"id": 9, "data": {}}], "label_config": config}, 422, "tasks.0.data.image: missing"),
        ("predict", {"tasks": [], "label_config": "<View/>"}, 422, "no <BrushLabels>"),
        ("predict", {"tasks": "x", "label_config": config}, 422, "tasks: a list"),
        ("setup", {"project": "3"}, 422, "schema: missing"),
        ("predict", b"{not json", 400, "not valid JSON"),
        ("webhook", b"[" * 100_000 + b"]" * 100_000, 400, "100000 levels deep"),
        ("webhook", {"action": "ANNOTATION_CREATED", "task": {"data": {"image": LABEL_STUDIO_IMAGE}},
                     "annotation": {"result": [{"type": "keypointlabels"}] * 1001}}, 413, "at most 1000 a request"),
        ("webhook", {"action": "ANNOTATION_CREATED", "task": {"data": {"image": LABEL_STUDIO_IMAGE}},
                     "annotation": {"result": [{"type": "keypointlabels", "to_name": "image", "original_width": 64,
                                                "original_height": 48, "value": {"x": 5, "y": 5,
                                                                                 "keypointlabels": ["Cat"]}}]}},
         422, "'Cat' is not one of"),
    ]:
        refused = post(route, body)
        assert refused.status_code == status and words in refused.text, (route, body, refused.text)

    before = load_clicks(str(clicks_store)).num_rows if clicks_store.exists() else 0  # other tests may store first
    points = [{"type": "keypointlabels", "to_name": "image", "from_name": "kp", "original_width": 64,
               "original_height": 48, "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["disk_1"]}}
              for x, y in [(50, 50), (25, 75)]]
    created = post("webhook", {"action": "ANNOTATION_CREATED", "task": {"id": 1, "data": {"image": LABEL_STUDIO_IMAGE}},
                               "project": {"id": 3, "label_config": config}, "annotation": {"id": 5, "result": points}})
    assert created.status_code == 201 and created.json()["stored"] == 2, created.text
    assert post("webhook", {"action": "PROJECT_UPDATED", "project": {"id": 3}}).json() == {"ignored": "PROJECT_UPDATED"}
    rows = [r for r in load_clicks(str(clicks_store)).to_pylist() if r["image_id"] == "street_07"]
    assert load_clicks(str(clicks_store)).num_rows == before + 2
    assert sorted((r["x"], r["y"], r["cls"], r["source"]) for r in rows) == [(16.0, 36.0, 1, "user"),
                                                                           (32.0, 24.0, 1, "user")]


def test_committee_answers_say_where_to_click(committee_server):
    image = encode(synthetic_image(21, height=48, width=64))
    answer = post_image(committee_server, image, fmt="json")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # the teachers are sure of different classes everywhere: one region, the whole image
    assert body["disagreement"] > 0.99 and float(answer.headers["X-Disagreement"]) > 0.99
    (click,) = body["suggested_clicks"]
    assert abs(click["x"] - 32) <= 2 and abs(click["y"] - 24) <= 2  # its most interior point
    assert answer.headers["X-Suggested-Clicks"] == f"{click['x']},{click['y']}"
    png = post_image(committee_server, image)
    assert png.status_code == 200 and png.headers["X-Suggested-Clicks"] == answer.headers["X-Suggested-Clicks"]
    model = requests.get(f"{committee_server}/v1/model", timeout=30).json()
    assert model["which"] == "teacher_ensemble" and model["inference"]["suggest_clicks"] == 3
    assert model["runtime"] == "torch"


def post_image(server: str, data: bytes, fmt: str = "png", content_type: str = "image/png", **params):
    return requests.post(f"{server}/v1/segment", params={"format": fmt, **params}, data=data,
                         headers={"Content-Type": content_type}, timeout=60)


RETRY_LIMIT_S = 300  # a hang guard for clients that retry after a 503, not a measurement


def post_until_answered(post) -> tuple[requests.Response, int]:
    """A client that retries after a 503 as its Retry-After says (the endpoint's contract under
    overload): (the first answer that is not a 503, how many 503s came before it). A client
    that never gets an answer is a hang, which pytest-timeout names; how long the retries
    took is bench/serve.py's figure, not an assertion here."""
    busy = 0
    while True:
        answer = post()
        if answer.status_code != 503:
            return answer, busy
        busy += 1
        assert float(answer.headers["retry-after"]) > 0, answer.headers
        time.sleep(float(answer.headers["retry-after"]))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


# ---- the three formats ----------------------------------------------------------------


def test_png_answer_is_the_models_prediction(server, segmenter):
    image = synthetic_image(1)
    answer = post_image(server, encode(image))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-model-version"] == "shapes/1"
    label_map = Image.open(io.BytesIO(answer.content))
    assert label_map.mode == "P" and label_map.size == (64, 64)
    assert label_map.getpalette()[: 3 * len(segmenter.palette)] == [v for c in segmenter.palette for v in c]
    expected, _ = segmenter.segment(image)
    # Same weights, same input, same kernels: equal up to float ties of an untrained model.
    assert agreement(np.asarray(label_map), expected) > 0.999
    assert answer.headers["x-classes-present"] == ",".join(map(str, np.unique(np.asarray(label_map))))


def test_jpeg_and_multipart_inputs(server, segmenter):
    jpeg = encode(synthetic_image(2), "JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    expected, _ = segmenter.segment(decoded)
    raw = post_image(server, jpeg, content_type="image/jpeg")
    multipart = requests.post(f"{server}/v1/segment", files={"file": ("photo.jpg", jpeg, "image/jpeg")}, timeout=60)
    for answer in (raw, multipart):
        assert answer.status_code == 200, answer.text
        assert agreement(np.asarray(Image.open(io.BytesIO(answer.content))), expected) > 0.999


def test_json_answer_rle_masks_and_confidence(server, segmenter):
    from serving.imaging import rle_decode_column_major

    image = synthetic_image(3, 48, 64)  # landscape: the long side is the inference size
    answer = post_image(server, encode(image), fmt="json")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == "shapes/1" and (body["height"], body["width"]) == (48, 64)
    assert "column-major" in body["rle_format"]
    expected, confidence = segmenter.segment(image)
    rebuilt = np.full((48, 64), 255, np.uint8)
    for cls in body["classes"]:
        assert cls["name"] == segmenter.classes[cls["id"]] and cls["color"] == list(segmenter.palette[cls["id"]])
        mask = rle_decode_column_major(cls["rle"]["counts"], *cls["rle"]["size"])
        assert mask.sum() == cls["pixels"]
        assert (rebuilt[mask] == 255).all()  # masks do not overlap
        rebuilt[mask] = cls["id"]
        if cls["pixels"] > 20:
            assert cls["mean_confidence"] == pytest.approx(confidence[expected == cls["id"]].mean(), abs=1e-3)
    assert (rebuilt != 255).all()  # and cover the image
    assert agreement(rebuilt, expected) > 0.999
    assert body["mean_confidence"] == pytest.approx(float(confidence.mean()), abs=1e-4)


def test_overlay_answer(server, segmenter):
    image = synthetic_image(4)
    answer = post_image(server, encode(image), fmt="overlay", alpha=0.6)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    assert overlay.shape == image.shape
    labels, _ = segmenter.segment(image)
    palette = np.asarray(segmenter.palette)
    blended = np.round(image * 0.4 + palette[labels] * 0.6)
    tinted = labels != 0  # class 0 is "background": left as it is
    close = np.abs(overlay - np.where(tinted[..., None], blended, image)).max(-1) <= 1
    assert close.mean() > 0.999


def test_any_image_size_comes_back_at_its_own_size(server):
    for height, width in [(37, 150), (300, 200), (5, 5)]:
        image = synthetic_image(5, height, width) if max(height, width) <= 64 else \
            np.asarray(Image.fromarray(synthetic_image(5)).resize((width, height)))
        answer = post_image(server, encode(image))
        assert answer.status_code == 200, answer.text
        label_map = Image.open(io.BytesIO(answer.content))
        assert label_map.size == (width, height)
        assert set(np.unique(np.asarray(label_map))) <= {0, 1, 2, 3}


# ---- refused inputs -------------------------------------------------------------------


def noise_png(height: int, width: int) -> bytes:
    return encode(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


BAD_INPUTS = {
    # name: (body, content type, status, error code)
    "empty": (b"", "image/png", 400, "empty_body"),
    "garbage": (b"\x00\x01 definitely not an image", "image/png", 400, "undecodable_image"),
    "truncated": (encode(np.full((64, 64, 3), 9, np.uint8))[:80], "image/png", 400, "undecodable_image"),
    "gif": (encode(np.zeros((16, 16, 3), np.uint8), "GIF"), "application/octet-stream", 415, "unsupported_media_type"),
    "text": (b"hello", "text/plain", 415, "unsupported_media_type"),
    "too_many_bytes": (noise_png(200, 200), "image/png", 413, "payload_too_large"),  # ~120 kB
    "too_many_pixels": (encode(np.zeros((700, 700, 3), np.uint8)), "image/png", 413, "too_many_pixels"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_get_4xx_with_a_reason(server, name):
    body, content_type, status, error = BAD_INPUTS[name]
    answer = post_image(server, body, content_type=content_type)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == error and answer.json()["detail"]
    assert answer.headers["x-model-version"] == "shapes/1"


def test_bad_multipart_and_parameters(server):
    no_file = requests.post(f"{server}/v1/segment", files={"note": (None, "no image here")}, timeout=30)
    assert no_file.status_code == 400 and "file" in no_file.json()["detail"]
    form = requests.post(f"{server}/v1/segment", data={"note": "no image here"}, timeout=30)
    assert form.status_code == 415  # application/x-www-form-urlencoded
    wrong_part_type = requests.post(f"{server}/v1/segment", files={"file": ("a.txt", b"hi", "text/plain")}, timeout=30)
    assert wrong_part_type.status_code == 415
    bad_format = post_image(server, encode(synthetic_image(6)), fmt="tiff")
    assert bad_format.status_code == 422 and "format" in bad_format.json()["detail"]


# ---- metadata, liveness, readiness ------------------------------------------------------


def test_model_health_and_readiness(server, segmenter):
    model = requests.get(f"{server}/v1/model", timeout=30).json()
    assert model["version"] == "shapes/1" and model["checkpoint_version"] == "serving-test@0"
    assert [c["name"] for c in model["classes"]] == segmenter.classes
    assert model["palette"] == [list(c) for c in segmenter.palette]
    assert model["click_source"] == "simulated" and model["which"] == "teacher_0" and model["runtime"] == "onnx"
    assert model["metrics"]["val/miou"] == 0.25 and model["metrics"]["val/iou/0"] is None  # NaN -> null
    assert model["registry"]["model"] == "shapes" and model["registry"]["version"] == 1
    assert model["inference"]["infer_size"] == INFER_SIZE
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"alive": True}
    ready = requests.get(f"{server}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True


# ---- load -----------------------------------------------------------------------------


def replica_rss_mb(app: str) -> float:
    """Resident memory of the app's one replica process (its pid from Ray's state API)."""
    from ray.util.state import list_actors

    (replica,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if a.class_name.startswith(f"ServeReplica:{app}:")]
    status = Path(f"/proc/{replica.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("requests_total, clients", [(300, 16), pytest.param(2000, 32, marks=pytest.mark.slow)])
def test_burst_with_malformed_requests_gets_no_5xx(server, requests_total, clients):
    """10% malformed: every good one 200, every bad one 4xx, none 5xx but a 503 with
    Retry-After (retried as told: a burst may meet the slow-upload crowd rule); after 2,000
    requests from 32 clients the replica's memory is within 20% of what it was before. (Its
    rate is a figure of bench/serve.py.)"""
    shapes = [(64, 64), (48, 64), (64, 40), (30, 64)]  # mixed shapes: batches pad and crop
    good = [encode(synthetic_image(i, *shapes[i % len(shapes)])) for i in range(8)]
    bad = [b"", b"junk", good[0][:50]]
    local = threading.local()

    def send(i: int) -> tuple[bool, int]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        malformed = i % 10 == 0
        body = bad[i % len(bad)] if malformed else good[i % len(good)]
        answer, _ = post_until_answered(lambda: session.post(f"{server}/v1/segment", data=body,
                                                             headers={"Content-Type": "image/png"}, timeout=120))
        return malformed, answer.status_code

    before = replica_rss_mb("seminar-test")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, range(requests_total)))
    elapsed = time.perf_counter() - start
    after = replica_rss_mb("seminar-test")
    statuses = [status for _, status in results]
    assert not [s for s in statuses if s >= 500], f"5xx answers: {sorted(set(statuses))}"
    assert all(status == 400 for malformed, status in results if malformed)
    assert all(status == 200 for malformed, status in results if not malformed)
    print(f"burst: {requests_total} requests in {elapsed:.1f} s ({requests_total / elapsed:.0f}/s, not a check); "
          f"replica {before:.0f} -> {after:.0f} MB")
    if requests_total >= 2000:
        assert after <= 1.2 * before, (before, after)


def open_slow_bodies(server: str, count: int, prefix: str = "") -> list:
    """`count` clients that announce 100 kB and send 10 bytes, then nothing."""
    import socket
    from urllib.parse import urlparse

    host, port = urlparse(server).hostname, urlparse(server).port
    head = (f"POST {prefix}/v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    slow = []
    for _ in range(count):
        conn = socket.create_connection((host, port), timeout=RETRY_LIMIT_S)
        conn.sendall(head + b"\x89PNG\r\n\x1a\n\x00\x00")
        slow.append(conn)
    return slow


def status_of(conn) -> int | None:
    """A raw connection's answer: its HTTP status, or None if it was closed unanswered."""
    line = conn.makefile("rb").readline()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None


def test_slow_bodies_get_408_or_503_and_do_not_hold_up_others(server):
    """100 clients announce 100 kB and send 10 bytes (more than the replica's 16 slots and 32
    queue places together): every one of them is answered, 408 (its body did not arrive in
    time) or 503 (too many uploads at once, or the queue full), never left hanging; meanwhile
    normal requests, retrying after a 503 as told, are answered 200, and so is one after the
    flood. Which slow client gets which answer is the admission rule's (tested on a fake clock
    in test_serving_units.py); how long a normal request waits is bench/slow_clients.py's figure."""
    slow = open_slow_bodies(server, 100)
    body = encode(synthetic_image(3))
    try:
        for _ in range(10):
            answer, _ = post_until_answered(lambda: post_image(server, body))
            assert answer.status_code == 200, answer.text
        statuses = [status_of(conn) for conn in slow]  # each read bounded by the socket's timeout
    finally:
        for conn in slow:
            conn.close()
    print(f"slow clients: {collections.Counter(statuses)}")
    assert set(statuses) <= {408, 503}, collections.Counter(statuses)
    answer, _ = post_until_answered(lambda: post_image(server, body))
    assert answer.status_code == 200, answer.text


def test_overload_answers_503_with_retry_after(ray_session, server, registry_model):
    """A deployment that holds 1 request and queues 1 more refuses the rest of a burst: every
    answer is a 200 or a 503 with Retry-After, and a burst of 24 at once meets a 503 (bursts
    repeated until one does, with a generous limit: how many get through depends on how the
    machine schedules the 24 senders); idle again, it answers 200."""
    from ray import serve

    from seminar.config import ServingConfig
    from serving.app import ServeArgs, build_app

    tight = ServingConfig(infer_size=INFER_SIZE, num_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
                          retry_after_s=2, torch_threads=1)
    serve.run(build_app(ServeArgs(model=registry_model[0], serving=tight)), name="tight", route_prefix="/tight")
    try:
        body = encode(synthetic_image(8))

        def post():
            return requests.post(f"{server}/tight/v1/segment", data=body, headers={"Content-Type": "image/png"},
                                 timeout=120)

        assert post().status_code == 200  # idle: nothing held, nothing queued
        seen = collections.Counter()

        def burst():
            barrier = threading.Barrier(24)

            def send(_):
                barrier.wait()
                return post()

            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                answers = list(pool.map(send, range(24)))
            for answer in answers:
                seen[answer.status_code] += 1
                assert answer.status_code in (200, 503), answer.text
                if answer.status_code == 503:
                    assert answer.headers["retry-after"] == "2", answer.headers
            return any(a.status_code == 503 for a in answers)

        wait_until(burst, RETRY_LIMIT_S, "no burst of 24 met a 503", interval=0)
        assert seen[200] >= 1, seen  # the deployment's own place: at least the first of a burst
        answer, _ = post_until_answered(post)
        assert answer.status_code == 200, answer.text
    finally:
        serve.delete("tight")


# ---- metrics --------------------------------------------------------------------------


def scrape_until(url: str, ready, timeout: float = 300.0) -> str:
    """Ray's exporter publishes every few seconds: poll until `ready(text)`."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        try:
            text = requests.get(url, timeout=10).text
        except requests.RequestException:
            text = ""
        if text and ready(text):
            return text
        time.sleep(1)
    raise AssertionError(f"metrics not exported within {timeout}s; last scrape:\n{text[-3000:]}")


def our_families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("ray_seminar_serve")}


@pytest.fixture(scope="module")
def exported_metrics(server, ray_cluster) -> str:
    """Ray's exporter's page once it shows this module's requests: 3 answered 200, 1 refused 400."""
    for i in range(3):
        assert post_image(server, encode(synthetic_image(i))).status_code == 200
    assert post_image(server, b"junk").status_code == 400

    def complete(text: str) -> bool:  # every family the tests read, with this module's samples
        families = our_families(text)
        requests_total = families.get("ray_seminar_serve_requests")
        info = families.get("ray_seminar_serve_model_info")
        return (requests_total is not None and {s.labels.get("status") for s in requests_total.samples} >= {"200", "400"}
                and info is not None and any(s.labels.get("model_version") == "shapes/1" for s in info.samples)
                and all(any(s.name == f"{name}_count" and s.value > 0 for s in families[name].samples)
                        if name in families else False
                        for name in ("ray_seminar_serve_request_seconds", "ray_seminar_serve_image_megapixels",
                                     "ray_seminar_serve_batch_images", "ray_seminar_serve_batch_megapixels")))

    return scrape_until(ray_cluster.metrics_url, complete)


def test_prometheus_metrics(exported_metrics):
    families = our_families(exported_metrics)
    assert families["ray_seminar_serve_requests"].type == "counter"
    answered = collections.Counter()  # summed over replicas (each sample also names its worker)
    for sample in families["ray_seminar_serve_requests"].samples:
        if sample.name.endswith("_total"):
            answered[sample.labels["route"], sample.labels["status"]] += sample.value
    assert answered["/v1/segment", "200"] >= 3 and answered["/v1/segment", "400"] >= 1, answered
    # every series names its app's model (Ray's exporter also keeps the series of apps that
    # other tests served on this cluster before: their versions are theirs, not checked here)
    assert all(s.labels.get("model_version") for f in families.values() for s in f.samples), families
    versions = {s.labels["model_version"] for f in families.values() for s in f.samples}
    assert {"shapes/1", "committee-test@0"} & versions and "shapes/1" in versions, versions
    for name in ("ray_seminar_serve_request_seconds", "ray_seminar_serve_image_megapixels",
                 "ray_seminar_serve_batch_images", "ray_seminar_serve_batch_megapixels"):
        assert families[name].type == "histogram", name
        count = [s for s in families[name].samples if s.name == f"{name}_count"]
        assert any(s.value > 0 for s in count), name  # per app and replica: some observed
    info = [s for s in families["ray_seminar_serve_model_info"].samples if s.labels["model_version"] == "shapes/1"]
    assert info and info[0].value == 1 and info[0].labels["which"] == "teacher_0"


def test_prometheus_metrics_pass_promtool(exported_metrics):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; make test installs it)")
    text = exported_metrics
    # Lint only our families, without the labels Ray's exporter adds to every series
    # (Component, NodeAddress, SessionName, Version, WorkerId: camelCase, which promtool flags).
    ray_labels = re.compile(r'\b(?:Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?')
    ours = "\n".join(ray_labels.sub("", line) for line in text.splitlines() if "ray_seminar_serve" in line) + "\n"
    lint = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# ---- the web page in a real browser -----------------------------------------------------


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect

        self.socket = connect(websocket_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(json.loads(self.socket.recv(timeout=max(0.1, deadline - time.time()))))
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with remote debugging on loopback; killed by its pid afterwards."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-proxy-server", "--window-size=1100,800",
         f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # port 0: Chromium binds one itself and writes it to DevToolsActivePort in its profile
        active = profile / "DevToolsActivePort"

        def port_written():
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            lines = active.read_text().splitlines() if active.is_file() else []
            return int(lines[0]) if lines and lines[0].isdigit() else None

        port = wait_until(port_written, 120, "chromium did not write its DevTools port")
        wait_for_port(port, timeout=120)
        yield port
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("app", ["server", "committee_server"])
def test_web_page_segments_a_dropped_image(app, request, chromium, tmp_path):
    server = request.getfixturevalue(app)
    clicks_store = request.getfixturevalue("clicks_store")
    targets = wait_until(lambda: [t for t in requests.get(f"http://127.0.0.1:{chromium}/json/list", timeout=30).json()
                                  if t["type"] == "page"], 120, "chromium shows no page")
    page = DevTools(targets[0]["webSocketDebuggerUrl"])
    page.call("Page.enable")
    page.call("Page.navigate", url=f"{server}/")  # the trailing slash: the page's base
    page.wait_event("Page.loadEventFired")
    assert page.evaluate("document.title") == "Seminar segmentation"

    picture = tmp_path / "shapes.png"
    picture.write_bytes(encode(np.asarray(Image.fromarray(synthetic_image(11)).resize((320, 240)))))
    document = page.call("DOM.getDocument")
    file_input = page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
    page.call("DOM.setFileInputFiles", nodeId=file_input["nodeId"], files=[str(picture)])

    wait_until(lambda: page.evaluate("document.body.dataset.state || ''") in ("done", "error"), RETRY_LIMIT_S,
               "the page did not finish segmenting")
    status = page.evaluate("document.getElementById('status').textContent")
    assert page.evaluate("document.body.dataset.state") == "done", status
    # the input and the segmentation side by side, both at the picture's own size
    assert page.evaluate("document.getElementById('input').naturalWidth") == 320
    assert page.evaluate("[document.getElementById('overlay').width, document.getElementById('overlay').height]") \
        == [320, 240]
    left, right = page.evaluate("['input', 'overlay'].map(id => document.getElementById(id).getBoundingClientRect())"
                                ".map(r => [r.left, r.right, r.top, r.width])")
    assert left[1] <= right[0] and abs(left[2] - right[2]) < 2 and left[3] > 100, (left, right)
    # the legend: each class present, with its share of the answer's pixels
    answer = post_image(server, picture.read_bytes(), fmt="json").json()
    expected = {c["name"]: 100 * c["fraction"] for c in answer["classes"]}
    legend = page.evaluate("[...document.querySelectorAll('#legend li')].map(li => li.textContent)")
    shares = {}
    for item in legend:
        match = re.fullmatch(r"(\w+) (\d+\.\d|<0\.1)%( \(not painted\))?", item)
        assert match and (match[3] is not None) == (match[1] == "background"), legend
        shares[match[1]] = 0.05 if match[2] == "<0.1" else float(match[2])
    assert shares.keys() == expected.keys() and all(abs(shares[k] - expected[k]) <= 0.051 for k in shares), \
        (legend, expected)
    # "Download label PNG": the label map the endpoint answers, as a file the browser saves
    href, filename = page.evaluate("(link => [link.href, link.download])(document.getElementById('download'))")
    assert href.startswith("blob:") and filename == "shapes-labels.png", (href, filename)
    saved = page.evaluate(f"fetch('{href}').then(r => r.blob()).then(b => new Promise(done => {{"
                          "const reader = new FileReader(); reader.onload = () => done(reader.result); "
                          "reader.readAsDataURL(b); }))")
    assert saved.startswith("data:image/png;base64,"), saved[:40]
    label_map = Image.open(io.BytesIO(base64.b64decode(saved.split(",", 1)[1])))
    assert label_map.mode == "P" and label_map.size == (320, 240)
    direct = np.asarray(Image.open(io.BytesIO(post_image(server, picture.read_bytes()).content)))
    assert agreement(np.asarray(label_map), direct) > 0.999
    dots = page.evaluate("document.querySelectorAll('.suggestion').length")
    if app == "committee_server":  # where to click next, drawn over the overlay
        assert dots == 1 and "1 suggested clicks" in status
        assert "committee-test@0" in page.evaluate("document.getElementById('model').textContent")
        # a correction click on the picture: class 2, at its centre -> the click store
        from seminar.data.clicks import load_clicks

        before = load_clicks(str(clicks_store)).num_rows if clicks_store.exists() else 0
        page.evaluate("document.getElementById('cls').value = '2'")
        box = page.call("DOM.getBoxModel", nodeId=page.call("DOM.querySelector", nodeId=document["root"]["nodeId"],
                                                            selector="#overlay")["nodeId"])["model"]["content"]
        x, y = (box[0] + box[4]) / 2, (box[1] + box[5]) / 2
        for kind in ("mousePressed", "mouseReleased"):
            page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        wait_until(lambda: page.evaluate("document.body.dataset.clicks || ''") == "1", RETRY_LIMIT_S,
                   "the page did not store the click")
        status = page.evaluate("document.getElementById('status').textContent")
        assert "stored a square_2 click" in status, status
        # the paint bucket: the clicked region now shows the click's class, the legend follows
        centre = page.evaluate("shown.labels[120 * shown.width + 160]")
        repainted = int(re.search(r"its region \((\d+) pixels\) repainted as square_2", status)[1])
        legend = page.evaluate("[...document.querySelectorAll('#legend li')].map(li => li.textContent)")
        assert centre == 2 and repainted > 0 and any(item.startswith("square_2 ") for item in legend), (status, legend)
        rows = load_clicks(str(clicks_store)).to_pylist()[before:]
        assert [(r["image_id"], r["cls"], r["source"]) for r in rows] == [("shapes", 2, "user")]
        assert abs(rows[0]["x"] - 160) <= 2 and abs(rows[0]["y"] - 120) <= 2
    else:
        assert dots == 0 and "suggested" not in status
        assert "shapes/1" in page.evaluate("document.getElementById('model').textContent")

    width, height = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                      clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"])
    screenshot = Path(os.environ.get("SEMINAR_SCREENSHOT_DIR", tmp_path)) / f"serving-web-page-{app}.png"
    screenshot.write_bytes(shot)
    # the whole page, as laid out: its size, and the picture and the overlay in it (not blank)
    pixels = Image.open(screenshot).convert("RGB")
    assert pixels.size == (width, height), (pixels.size, width, height)
    crop = pixels.crop((int(left[0]), int(left[2]), int(right[1]), int(left[2] + 100)))
    assert len(crop.getcolors(maxcolors=1 << 16) or range(1 << 16)) >= 8, "the picture and its overlay are not drawn"
    print(f"screenshot: {screenshot}")
