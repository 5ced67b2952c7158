"""Label Studio's ML backend, the parts without Ray: its brush RLE, labeling configs, task
images over real loopback HTTP, key points as clicks. The routes on a real Serve app are
tested in test_serving.py (test_label_studio_backend_round_trip)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import file_server
from serving.imaging import InputError
from serving.label_studio import (
    annotation_clicks,
    brush_rle,
    fetch_image,
    image_id,
    labeling_config,
    prediction,
    task_image,
)

DATA = Path(__file__).parent / "data"
CLASSES = ("background", "disk_1", "square_2", "triangle_3")
CONFIG = """<View>
  <Image name="photo" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="photo">
    <Label value="Background"/><Label value="Square_2"/><Label value="Cat"/>
  </BrushLabels>
  <KeyPointLabels name="clicks" toName="photo"><Label value="square_2"/></KeyPointLabels>
</View>"""


def fixture_masks() -> dict[str, np.ndarray]:
    """The masks tests/data/make_label_studio_rle.py encoded with label-studio-sdk."""
    label = np.array(Image.open(DATA / "camvid_tiny/trainannot/0001TP_006690.png").resize((120, 90), Image.NEAREST))
    return {"camvid_car_120x90": label == 8, "camvid_building_120x90": label == 1,
            "empty_7x5": np.zeros((5, 7), bool), "full_300x250": np.ones((250, 300), bool),
            "two_pixels_4x2": np.array([[1, 0, 0, 1], [0, 0, 0, 0]], bool)}


def test_brush_rle_is_label_studios_own_byte_for_byte():
    reference = json.loads((DATA / "label_studio_rle.json").read_text())
    masks = fixture_masks()
    assert len(reference["masks"]) == len(masks) == 5
    for entry in reference["masks"]:
        mask = masks[entry["name"]]
        assert mask.shape == (entry["height"], entry["width"])
        assert brush_rle(mask) == entry["rle"], entry["name"]


def test_labeling_config_matches_labels_to_classes_by_name():
    config = labeling_config(CONFIG, CLASSES)
    assert (config.image_key, config.image_name, config.brush_name) == ("image", "photo", "mask")
    assert config.class_labels == {0: "Background", 2: "Square_2"}  # 'Cat' is no class of the model
    for xml, words in [
        ("<View><Image name='i' value='$image'/></View>", "no <BrushLabels>"),
        ("<View><BrushLabels name='m' toName='x'><Label value='disk_1'/></BrushLabels></View>", 'toName="x"'),
        ("<View><Image name='i' value='$image'/><BrushLabels name='m' toName='i'><Label value='Dog'/>"
         "</BrushLabels></View>", "none of the labels ['Dog']"),
        ("<View><Image", "not XML"),
    ]:
        with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")) as refused:
            labeling_config(xml, CLASSES)
        assert refused.value.status == 422


def test_prediction_has_a_region_per_named_class_present():
    labels = np.array([[0, 0, 2], [2, 1, 1]], np.uint8)
    confidence = np.array([[0.9, 0.7, 0.5], [0.3, 0.8, 0.8]], np.float32)
    answer = prediction(labels, confidence, labeling_config(CONFIG, CLASSES), "v7")
    assert answer["model_version"] == "v7" and answer["score"] == pytest.approx(confidence.mean())
    background, square = answer["result"]  # disk_1 is present but not in the config
    assert background["value"]["brushlabels"] == ["Background"] and square["value"]["brushlabels"] == ["Square_2"]
    assert square["value"]["rle"] == brush_rle(labels == 2) and square["score"] == pytest.approx(0.4)
    assert (square["from_name"], square["to_name"], square["type"]) == ("mask", "photo", "brushlabels")
    assert (square["original_width"], square["original_height"]) == (3, 2)


@pytest.fixture
def label_studio_files():
    png = (DATA / "voc_tiny/SegmentationClass/2007_000033.png").read_bytes()
    with file_server({"/data/upload/3/0a1b2c3d-street.png": png}, token="secret-key") as (url, seen):
        yield url, png, seen


def test_task_images_come_from_label_studio_with_its_key_only(label_studio_files, monkeypatch):
    url, png, seen = label_studio_files
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key")
    assert fetch_image("/data/upload/3/0a1b2c3d-street.png", url, 10**6, 5) == png
    assert fetch_image(f"{url}/data/upload/3/0a1b2c3d-street.png", url, 10**6, 5) == png
    # a loopback host that is not Label Studio's is not asked at all (a task could probe the
    # services beside the endpoint), nor is any private, link-local or unspecified address
    asked = len(seen)
    for ref in (f"{url}/data/upload/3/0a1b2c3d-street.png", "http://10.1.2.3/x.png", "http://169.254.169.254/latest",
                "http://[::1]:9/x.png", "http://0.0.0.0/x.png"):
        with pytest.raises(InputError, match="is not a public address") as refused:
            fetch_image(ref, "http://label-studio.example", 10**6, 5)
        assert refused.value.status == 422
    assert len(seen) == asked
    # a personal access token (a JWT) goes as Bearer
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "eyJh.eyJ0.c2ln")
    with pytest.raises(InputError, match="HTTP 401"):
        fetch_image("/data/upload/3/0a1b2c3d-street.png", url, 10**6, 5)
    assert seen[-1]["Authorization"] == "Bearer eyJh.eyJ0.c2ln"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key")
    for ref, base, limit, status, words in [
        ("/data/upload/3/missing.png", url, 10**6, 422, "missing.png: HTTP 404"),
        ("/data/upload/3/0a1b2c3d-street.png", None, 10**6, 422, "serving.label_studio_url is not set"),
        ("/data/upload/3/0a1b2c3d-street.png", url, 100, 413, "larger than 100 bytes"),
        ("ftp://host/x.png", url, 10**6, 422, "not an http(s) URL"),
        ("http://127.0.0.1:1/x.png", url, 10**6, 422, "127.0.0.1:1/x.png: 127.0.0.1 is not a public address"),
    ]:
        with pytest.raises(InputError, match=re.escape(words)) as refused:
            fetch_image(ref, base, limit, 5)
        assert refused.value.status == status


def test_image_id_is_the_training_file_stem():
    assert image_id("/data/upload/3/0a1b2c3d-0001TP_006690.png") == "0001TP_006690"
    assert image_id("/data/local-files/?d=camvid/train/0001TP_006690.png") == "0001TP_006690"
    assert image_id("s3://bucket/photos/street%2001.jpg") == "street 01"
    assert image_id("https://host/img/0a1b2c3d.jpg") == "0a1b2c3d"  # a bare hex name is a name


def test_key_points_become_clicks_in_image_pixels():
    def point(x, y, label="square_2", to_name="photo"):
        return {"type": "keypointlabels", "to_name": to_name, "from_name": "clicks", "original_width": 200,
                "original_height": 100, "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}

    task = {"id": 4, "data": {"image": "/data/upload/3/0a1b2c3d-street.png", "note": "x"}}
    brush = {"type": "brushlabels", "value": {"rle": [1, 2], "brushlabels": ["Background"]}}
    payload = {"action": "ANNOTATION_CREATED", "task": task,
               "annotation": {"result": [point(10, 50), brush, point(100, 100, "Background")]}}
    # the image is found through the project's labeling config (<Image name="photo" value="$image">)
    with_project = {**payload, "project": {"id": 3, "label_config": CONFIG}}
    assert annotation_clicks(with_project, CLASSES) == ("street", [(20.0, 50.0, 2), (199.0, 99.0, 0)])
    # without it, through a data key named as the image tag, or the task's only value
    renamed = {**payload, "task": {"data": {"photo": "/data/upload/3/0a1b2c3d-road.png", "note": "x"}}}
    assert annotation_clicks(renamed, CLASSES)[0] == "road"
    alone = {**payload, "task": {"data": {"img": "/data/upload/3/0a1b2c3d-lane.png"}}}
    assert annotation_clicks(alone, CLASSES)[0] == "lane"
    with pytest.raises(InputError, match="task.data: which value holds the image"):
        annotation_clicks(payload, CLASSES)
    for region, words in [(point(10, 50, "Dog"), "'Dog' is not one of"), (point(101, 5), "outside the image"),
                          ({"type": "keypointlabels", "value": {"x": 1}}, "annotation.result.0: needs")]:
        with pytest.raises(InputError, match=words):
            annotation_clicks({**with_project, "annotation": {"result": [region]}}, CLASSES)
    with pytest.raises(InputError, match="needs 'task' and 'annotation'"):
        annotation_clicks({"action": "ANNOTATION_CREATED"}, CLASSES)


# --- the fuzz corpus: Label Studio bodies mutated at random (seeded) -------------------------

HOSTILE_VALUES = [None, 0, -1, 1e308, float("nan"), float("inf"), 2**70, "", "x" * 10_000, "\x00", "%s",
                  "../../etc/passwd", [], [None], {}, {"x": {}}, True]


def mutations(payload, rng, depth=0):
    """A copy of a JSON-like payload with one node, chosen at random, replaced by a hostile value."""
    if depth > 0 and (rng.random() < 0.3 or not isinstance(payload, (dict, list)) or not payload):
        return HOSTILE_VALUES[rng.integers(len(HOSTILE_VALUES))]
    if isinstance(payload, dict) and payload:
        key = list(payload)[rng.integers(len(payload))]
        return {**payload, key: mutations(payload[key], rng, depth + 1)}
    if isinstance(payload, list) and payload:
        i = int(rng.integers(len(payload)))
        return payload[:i] + [mutations(payload[i], rng, depth + 1)] + payload[i + 1:]
    return HOSTILE_VALUES[rng.integers(len(HOSTILE_VALUES))]


def test_hostile_label_studio_bodies_are_422s_never_crashes():
    """Every mutated webhook, task and labeling config ends in an answer or an InputError (a 4xx
    naming the field), never another exception (a 500)."""
    rng = np.random.default_rng(0)
    point = {"type": "keypointlabels", "to_name": "photo", "original_width": 200, "original_height": 100,
             "value": {"x": 10, "y": 50, "keypointlabels": ["square_2"]}}
    webhook = {"action": "ANNOTATION_CREATED", "project": {"label_config": CONFIG},
               "task": {"id": 4, "data": {"image": "/data/upload/3/0a1b2c3d-street.png"}},
               "annotation": {"result": [point, point]}}
    outcomes = {"webhook": [0, 0], "task": [0, 0], "config": [0, 0]}  # [answered, refused]
    for _ in range(2000):
        try:
            annotation_clicks(mutations(webhook, rng), CLASSES)
            outcomes["webhook"][0] += 1
        except InputError as e:
            assert 400 <= e.status < 500 and e.detail
            outcomes["webhook"][1] += 1
        try:
            task_image(mutations({"data": {"image": "/x.png"}}, rng), "image", "tasks.0")
            outcomes["task"][0] += 1
        except InputError as e:
            assert e.status == 422 and "tasks.0" in e.detail
            outcomes["task"][1] += 1
    xml = CONFIG.encode()
    for _ in range(500):  # configs cut, with bytes dropped or changed
        data = bytearray(xml[: rng.integers(len(xml) + 1)])
        for i in rng.integers(0, max(len(data), 1), rng.integers(0, 4)):
            if i < len(data):
                data[i] = int(rng.integers(256))
        try:
            labeling_config(data.decode("utf-8", "replace"), CLASSES)
            outcomes["config"][0] += 1
        except InputError as e:
            assert e.status == 422 and e.detail
            outcomes["config"][1] += 1
    # the mutations reach the checks (many refused) and do not all break the input (some bodies
    # answered; a cut config hardly ever stays valid XML)
    assert all(refused >= 50 for _, refused in outcomes.values()), outcomes
    assert outcomes["webhook"][0] >= 10 and outcomes["task"][0] >= 10, outcomes
