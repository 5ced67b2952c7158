"""The serving layer's parts without Ray: input checks, encodings, batching, model lookup, config, CLI.

The endpoint itself, on a real Serve app, is tested in test_serving.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from seminar.config import ServingConfig
from seminar.data.transforms import model_input, normalize
from seminar.predict import restore_size
from serving.batching import (
    PixelBudget,
    QueuedImage,
    batch_cost,
    pad_and_stack,
    predict_batch,
)
from serving.imaging import (
    InputError,
    check_declared_type,
    decode_image,
    label_png,
    overlay_png,
    rle_column_major,
    rle_decode_column_major,
    segmentation_json,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def make_checkpoint(directory: Path, model: str = "deeplabv3plus_mobilenetv2") -> Path:
    """An untrained one-student checkpoint, written by the training code's own writer."""
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    cfg = load_spec(None, ["method.w_ss=0", f"students=[{{model: {model}}}]",
                           "data.synthetic.image_size=64", "storage.run_name=serving-test"])
    write_initial_checkpoint(str(directory), cfg, {"val/miou": 0.25, "val/iou/0": float("nan")})
    return directory


def encode(image: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt, **kwargs)
    return out.getvalue()


# ---- input checks --------------------------------------------------------------------


def test_decode_png_and_jpeg_to_rgb():
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(image), 10**6), image)
    jpeg = decode_image(encode(image, "JPEG"), 10**6)
    assert jpeg.shape == (30, 50, 3) and jpeg.dtype == np.uint8
    grey = decode_image(encode(image[..., 0]), 10**6)  # mode L -> RGB
    assert grey.shape == (30, 50, 3)


@pytest.mark.parametrize("data, status, error", [
    (b"", 400, "empty_body"),
    (b"this is not an image", 400, "undecodable_image"),
    (encode(np.zeros((20, 20, 3), np.uint8), "GIF"), 415, "unsupported_media_type"),
    (encode(np.zeros((20, 20, 3), np.uint8), "BMP"), 415, "unsupported_media_type"),
    (encode(np.full((64, 64, 3), 7, np.uint8))[:60], 400, "undecodable_image"),  # truncated
    (encode(np.zeros((200, 300, 3), np.uint8)), 413, "too_many_pixels"),
])
def test_refused_inputs(data, status, error):
    with pytest.raises(InputError) as refused:
        decode_image(data, max_pixels=50_000)
    assert (refused.value.status, refused.value.error) == (status, error)
    assert refused.value.detail


@pytest.mark.parametrize("photo", ["2007_000032.jpg", "2011_000025.jpg"])
def test_every_truncated_prefix_of_a_real_photo_is_a_400(photo):
    """Cut anywhere before its end marker (in the header too: Pillow's 'Truncated File Read'),
    a real JPEG or its PNG re-encoding is refused as undecodable, never an unhandled error (a
    500). (Without only its trailer, JPEG's 2-byte EOI or PNG's last checksums and 12-byte
    IEND, every pixel is there and the image decodes: measured, PNG decodes from 21 bytes short.)"""
    jpeg = (DATA / "voc_tiny" / "JPEGImages" / photo).read_bytes()
    png = encode(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[:64, :64])
    for data, end_marker in ((jpeg, 2), (png, 24)):
        last = len(data) - end_marker - 1
        cuts = sorted(set(range(1, 400)) | set(np.linspace(400, last, 100).astype(int).tolist()))
        for cut in cuts:
            with pytest.raises(InputError) as refused:
                decode_image(data[:cut], max_pixels=16 * 2**20)
            assert (refused.value.status, refused.value.error) == (400, "undecodable_image"), cut


def test_pixel_limit_is_checked_before_decoding():
    # 5000 x 5000 declared in the header, a few kilobytes on the wire: never decoded.
    bomb = encode(np.zeros((5000, 5000), np.uint8))
    assert len(bomb) < 100_000
    with pytest.raises(InputError) as refused:
        decode_image(bomb, max_pixels=16 * 2**20)
    assert refused.value.status == 413


def test_declared_types():
    for ok in (None, "", "image/png", "image/jpeg; charset=binary", "application/octet-stream"):
        check_declared_type(ok)
    for bad in ("text/plain", "image/gif", "application/json"):
        with pytest.raises(InputError) as refused:
            check_declared_type(bad)
        assert refused.value.status == 415


def test_model_input_keeps_aspect_and_matches_pillow():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    assert model_input(image, 1.0, 64).shape == (3, 48, 64)  # the long side bounded by infer_size
    assert model_input(image, 0.5, 512).shape == (3, 150, 200)  # the model's training scale
    assert model_input(np.zeros((10, 5, 3), np.uint8), 1.0, 64).shape == (3, 10, 5)  # never upscaled past it
    assert torch.equal(model_input(image, 1.0, 400), normalize(image))  # already the size: only normalised
    # Shrinking antialiases like Pillow's bilinear filter: a few grey levels apart at most.
    photo = np.asarray(Image.open(DATA / "voc_tiny" / "JPEGImages" / "2007_000032.jpg").convert("RGB"))
    ours = model_input(photo, 1.0, 250)
    pillow = np.asarray(Image.fromarray(photo).resize(ours.shape[:0:-1], Image.Resampling.BILINEAR))
    assert np.abs(normalize(pillow) - ours).max() < 3 / 255 / 0.224  # 3 levels at the smallest std


# ---- encodings -----------------------------------------------------------------------


def test_rle_is_coco_column_major():
    mask = np.array([[0, 1, 1],
                     [0, 0, 1]], dtype=bool)
    # column-major: column 0 = (0, 0), column 1 = (1, 0), column 2 = (1, 1) -> 0 0 1 0 1 1
    assert rle_column_major(mask) == [2, 1, 1, 2]
    assert rle_column_major(np.ones((2, 2), bool)) == [0, 4]  # starts with an empty run of zeros
    rng = np.random.default_rng(1)
    for _ in range(5):
        random_mask = rng.random((13, 7)) > 0.6
        counts = rle_column_major(random_mask)
        assert sum(counts) == random_mask.size
        assert np.array_equal(rle_decode_column_major(counts, 13, 7), random_mask)


def test_segmentation_json_lists_present_classes():
    labels = np.array([[0, 0, 2], [2, 2, 2]], np.uint8)
    confidence = np.array([[0.5, 0.7, 0.9], [0.8, 0.6, 0.7]], np.float32)
    answer = segmentation_json(labels, confidence, ["bg", "a", "b"], [(0, 0, 0), (1, 1, 1), (2, 2, 2)], "m/1")
    assert [c["id"] for c in answer["classes"]] == [0, 2]
    by_id = {c["id"]: c for c in answer["classes"]}
    assert by_id[2]["pixels"] == 4 and by_id[2]["mean_confidence"] == pytest.approx(0.75)
    assert by_id[0]["mean_confidence"] == pytest.approx(0.6)
    assert answer["mean_confidence"] == pytest.approx(confidence.mean())
    assert "column-major" in answer["rle_format"]
    rebuilt = np.zeros_like(labels)
    for c in answer["classes"]:
        rebuilt[rle_decode_column_major(c["rle"]["counts"], *c["rle"]["size"])] = c["id"]
    assert np.array_equal(rebuilt, labels)


def test_label_png_is_a_palette_image():
    labels = np.array([[0, 1], [3, 2]], np.uint8)
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    image = Image.open(io.BytesIO(label_png(labels, palette)))
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), labels)
    assert image.getpalette()[:12] == [v for c in palette for v in c]


def test_overlay_leaves_background_untinted():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [1, 0]], np.uint8)
    out = np.asarray(Image.open(io.BytesIO(overlay_png(image, labels, [(0, 0, 0), (200, 0, 0)], 0.5, (0,)))))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [150, 50, 50]


# ---- batching ------------------------------------------------------------------------


def test_pixel_budget_bounds_count_and_padded_pixels():
    budget = PixelBudget(max_images=4, max_pixels=64 * 64 * 2)

    def queued(h, w):
        return QueuedImage(torch.zeros(3, h, w), budget)

    small = [queued(16, 16)] * 4
    assert batch_cost(small) == 4  # count-bound: 4 slots for 4 small images
    assert batch_cost(small + [queued(16, 16)]) > 4  # a fifth image does not fit
    assert batch_cost([queued(64, 64)] * 2) == 4  # two full-size images fill the pixel budget
    assert batch_cost([queued(64, 64)] * 3) > 4
    # a portrait and a landscape pad to 64 x 64 each: priced as two full-size images
    assert batch_cost([queued(64, 48), queued(48, 64)]) == 4
    assert batch_cost([queued(64, 64)]) <= 4  # one image always fits


def test_padded_batch_crops_back_to_each_image():
    tensors = [torch.randn(3, 8, 12), torch.randn(3, 12, 6)]
    stacked = pad_and_stack(tensors)
    assert stacked.shape == (2, 3, 12, 12)
    assert torch.equal(stacked[0, :, :8, :12], tensors[0]) and stacked[0, :, 8:].abs().sum() == 0

    def identity_probs(x):  # a "model" whose output is its input: cropping must return the input
        return x

    out = predict_batch(identity_probs, tensors)
    assert [tuple(o.shape) for o in out] == [(3, 8, 12), (3, 12, 6)]
    assert all(torch.equal(o, t) for o, t in zip(out, tensors))

    def quarter_probs(x):  # a network answering at its decoder's stride 4, sizes rounded up
        return F.avg_pool2d(x, 4, ceil_mode=True)

    out = predict_batch(quarter_probs, [torch.randn(3, 8, 12), torch.randn(3, 14, 6)])
    assert [tuple(o.shape) for o in out] == [(3, 2, 3), (3, 4, 2)]


def test_restore_size_matches_full_upsample_argmax(monkeypatch):
    logits = 4 * torch.randn(5, 9, 13)
    probs = logits.softmax(0)
    # what validation scores: the argmax of the logits upsampled to the mask's size
    expected_conf, expected_labels = F.interpolate(logits[None], size=(40, 30), mode="bilinear",
                                                   align_corners=False)[0].softmax(0).max(0)
    import seminar.predict

    monkeypatch.setattr(seminar.predict, "RESTORE_CHUNK_VALUES", 40 * 30 * 2)  # 2 classes per chunk
    labels, confidence = restore_size(probs, 40, 30)
    assert labels.dtype == np.uint8 and labels.shape == (40, 30)
    assert np.array_equal(labels, expected_labels.numpy())
    assert np.allclose(confidence, expected_conf.numpy(), atol=1e-5)
    same_labels, _ = restore_size(probs, 9, 13)
    assert np.array_equal(same_labels, probs.argmax(0).numpy())


# ---- model lookup, config, CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serving-units") / "checkpoint")


def test_resolve_checkpoint_and_registry_names(checkpoint, tmp_path, monkeypatch):
    from seminar.registry import ModelRegistry, resolve_model

    direct = resolve_model(str(checkpoint))
    assert Path(direct.checkpoint) == checkpoint and direct.version == "serving-test@0"

    registry = tmp_path / "registry"
    ModelRegistry(str(registry)).publish(str(checkpoint), "shapes")
    ModelRegistry(str(registry)).publish(str(checkpoint), "shapes")
    latest = resolve_model(f"{registry}/shapes")
    assert latest.version == "shapes/2" and (Path(latest.checkpoint) / "meta.json").is_file()
    assert resolve_model(f"{registry}/shapes/1").version == "shapes/1"
    monkeypatch.setenv("SEMINAR_REGISTRY", str(registry))
    assert resolve_model("shapes/1").version == "shapes/1"
    assert resolve_model("shapes", registry=str(registry)).version == "shapes/2"
    with pytest.raises(Exception, match="no model 'other'"):
        resolve_model("other")


def test_a_checkpoint_on_s3_is_served_from_its_weights_alone(checkpoint, s3_bucket):
    """`seminar serve s3://...`: the replica fetches meta.json and the weights that answer,
    not the optimizer state (the registry's whole-directory download is not on this path)."""
    from seminar import checkpoint as checkpoints
    from seminar import storage
    from seminar.predict import Segmenter
    from seminar.registry import resolve_model

    uri = f"s3://{s3_bucket}/runs/demo/checkpoint_000000"
    storage.upload_dir(checkpoint, uri)
    resolved = resolve_model(uri)
    assert (resolved.checkpoint, resolved.version) == (uri, "serving-test@0")
    Segmenter.load(resolved.checkpoint)
    cached = checkpoints.local_copy(uri, [])
    assert sorted(str(p.relative_to(cached)) for p in cached.rglob("*") if p.is_file()) == [
        "meta.json", "student_0/teacher.pt"]


def test_serving_config_checks_budget():
    with pytest.raises(ValueError, match="batch_pixel_budget"):
        ServingConfig(infer_size=2048, batch_pixel_budget=2**20)
    with pytest.raises(ValueError, match="min_replicas"):
        ServingConfig(min_replicas=3, max_replicas=2)


def test_serve_config_yaml_builds_the_application(checkpoint):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema
    from ray._common.utils import import_attr

    raw = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app_config = schema.applications[0]
    args = {**app_config.args, "model": str(checkpoint)}
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), args)
    deployment = app._bound_deployment
    assert deployment.name == "segmenter"
    assert deployment._deployment_config.max_queued_requests == raw["applications"][0]["args"]["serving"]["max_queued_requests"]
    assert deployment._deployment_config.backpressure_config.retry_after_s == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 2


def test_cli_registers_serve_and_refuses_unknown_models(tmp_path):
    from typer.testing import CliRunner

    from jobs.main import app

    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert "--replicas" in help_text and "--port" in help_text
    result = runner.invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "cannot load model" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path), "--set", "infer_size=8"])
    assert result.exit_code == 2 and "infer_size" in result.output


def test_checkpoints_of_earlier_versions_load_without_their_retired_fields(tmp_path):
    """A checkpoint's spec recorded by an earlier version (here with schedule.eval_samples,
    retired since) still loads; a field no version ever had is still refused by name."""
    import json

    from seminar.predict import Segmenter

    checkpoint = make_checkpoint(tmp_path / "old")
    meta_file = checkpoint / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"]["schedule"]["eval_samples"] = 4
    meta_file.write_text(json.dumps(meta))
    assert Segmenter.load(str(checkpoint)).classes
    meta["spec"]["schedule"]["never_a_field"] = 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="never_a_field"):
        Segmenter.load(str(checkpoint))


# ---- the upload-admission rule, on a fake clock ------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_upload_admission_gives_the_first_slow_uploads_the_full_timeout_then_the_short_one():
    from serving.app import CROWDED_STALL_S, SLOW_UPLOAD_S, UploadAdmission

    clock = FakeClock()
    rule = UploadAdmission(max_slow_uploads=3, body_timeout_s=5.0, retry_after_s=2, clock=clock)
    # the first 3 bodies in flight: the full timeout, no stall limit
    assert [rule.admit() for _ in range(3)] == [(5.0, None, False)] * 3
    # a fourth while 3 arrive: the crowd rule, short deadline and stall limit
    assert rule.admit() == (SLOW_UPLOAD_S, CROWDED_STALL_S, True)
    assert rule.crowded_until == clock.now + 5.0
    # a crowded body that times out: 503 with Retry-After, and the crowd rule extended
    clock.now += 1.0
    busy = rule.timed_out(crowded=True)
    assert (busy.status, busy.error, busy.retry_after_s) == (503, "busy", 2) and "3 other uploads" in busy.detail
    assert rule.crowded_until == clock.now + 5.0
    # an uncrowded body that times out keeps its 408 (None: no other answer)
    assert rule.timed_out(crowded=False) is None
    for _ in range(4):
        rule.done()
    assert rule.uploads == 0
    # the crowd gone, but seen less than body_timeout_s ago: still the short deadline
    clock.now += 4.9
    assert rule.admit()[2] is True
    rule.done()
    # body_timeout_s after it was last seen: the full timeout again
    clock.now = rule.crowded_until
    assert rule.admit() == (5.0, None, False)
    rule.done()


def test_upload_admission_never_shortens_past_the_body_timeout():
    from serving.app import UploadAdmission

    rule = UploadAdmission(max_slow_uploads=0, body_timeout_s=0.5, retry_after_s=1, clock=FakeClock())
    assert rule.admit() == (0.5, 0.25, True)  # min(SLOW_UPLOAD_S, body_timeout_s)


@pytest.mark.parametrize("crowded", [False, True])
def test_upload_admission_answers_a_late_body_408_or_503(crowded, monkeypatch):
    """receive(): a body that does not arrive is a 408, or a 503 with Retry-After when it came
    in a crowd; either way its upload no longer counts."""
    import asyncio

    import serving.app
    from serving.app import UploadAdmission

    seen = []

    async def late_body(request, max_bytes, timeout_s, json_body=False, stall_s=None):
        seen.append((timeout_s, stall_s))
        raise InputError(408, "body_timeout", "the request body did not arrive")

    monkeypatch.setattr(serving.app, "read_upload", late_body)
    rule = UploadAdmission(max_slow_uploads=0 if crowded else 8, body_timeout_s=3.0, retry_after_s=2,
                           clock=FakeClock())
    with pytest.raises(InputError) as refused:
        asyncio.run(rule.receive(None, 100))
    assert (refused.value.status, refused.value.error) == ((503, "busy") if crowded else (408, "body_timeout"))
    assert seen == [(1.0, 0.25)] if crowded else seen == [(3.0, None)]
    assert rule.uploads == 0
