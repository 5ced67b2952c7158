"""The ML backend against a real Label Studio: a project, an uploaded photo, predictions that
Label Studio asks for and stores, and a key-point annotation that reaches the click store
through the webhook Label Studio registers for the backend.

Needs a running Label Studio (its own environment: `pip install label-studio`; it is not a
dependency of this project) and a running endpoint that knows it:

    # legacy tokens on; the endpoint on loopback allowed (Label Studio refuses private addresses by default)
    LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true SSRF_PROTECTION_ENABLED=false USE_DEFAULT_BANNED_SUBNETS=false \\
        label-studio start --no-browser --port 8080 --username admin@example.com --password PASSWORD --user-token TOKEN
    LABEL_STUDIO_API_KEY=TOKEN seminar serve MODEL --set label_studio_url=http://127.0.0.1:8080 \\
        --set clicks_store=runs/ls-clicks
    LABEL_STUDIOS_PYTHON scripts/label_studio_e2e.py --token TOKEN --photo PHOTO --clicks-store runs/ls-clicks

Checks: Label Studio connects the backend (its /health and /setup), stores one prediction for
the task whose brush masks, decoded with Label Studio's own `decode_rle` (label-studio-sdk),
equal the endpoint's /v1/segment label map; a webhook
Label Studio sends on ANNOTATION_CREATED stores the annotation's key points as clicks.
Run with Label Studio's Python (it has label-studio-sdk and pyarrow), from the repository root.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label-studio", default="http://127.0.0.1:8080")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="a Label Studio API token (legacy)")
    parser.add_argument("--photo", required=True)
    parser.add_argument("--clicks-store", required=True, help="the endpoint's serving.clicks_store")
    args = parser.parse_args()
    ls = requests.Session()
    ls.headers["Authorization"] = f"Token {args.token}"
    classes = [c["name"] for c in requests.get(f"{args.endpoint}/v1/model", timeout=30).json()["classes"]]
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    config = (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}'
              f'</BrushLabels><KeyPointLabels name="kp" toName="image">{labels}</KeyPointLabels></View>')

    project = ls.post(f"{args.label_studio}/api/projects", json={"title": "seminar e2e", "label_config": config})
    project.raise_for_status()
    pid = project.json()["id"]
    photo = Path(args.photo)
    with photo.open("rb") as f:
        ls.post(f"{args.label_studio}/api/projects/{pid}/import", files={photo.name: f}).raise_for_status()
    (task,) = ls.get(f"{args.label_studio}/api/tasks", params={"project": pid}).json()["tasks"]
    print(f"task {task['id']}: {task['data']['image']}")

    backend = ls.post(f"{args.label_studio}/api/ml", json={"url": f"{args.endpoint}/label-studio", "project": pid,
                                                           "title": "seminar"})
    print(f"POST /api/ml: {backend.status_code} {backend.text[:200]}")
    backend.raise_for_status()
    # as the data manager's "Retrieve Predictions" action does
    action = ls.post(f"{args.label_studio}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                     json={"selectedItems": {"all": False, "included": [task["id"]]}})
    print(f"retrieve_tasks_predictions: {action.status_code} {action.text[:200]}")
    predictions = []
    for _ in range(30):
        predictions = ls.get(f"{args.label_studio}/api/predictions", params={"task": task["id"]}).json()
        if predictions:
            break
        time.sleep(1)
    assert len(predictions) == 1, predictions
    (prediction,) = predictions
    regions = prediction["result"]
    print(f"prediction: model_version {prediction['model_version']}, score {prediction['score']:.3f}, "
          f"{len(regions)} regions: {', '.join(r['value']['brushlabels'][0] for r in regions)}")

    answer = requests.post(f"{args.endpoint}/v1/segment", data=photo.read_bytes(),
                           headers={"Content-Type": "image/png" if photo.suffix == ".png" else "image/jpeg"}, timeout=60)
    label_map = np.array(Image.open(io.BytesIO(answer.content)))
    for region in regions:
        cls = classes.index(region["value"]["brushlabels"][0])
        height, width = region["original_height"], region["original_width"]
        mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
        assert (mask == (label_map == cls)).all(), region["value"]["brushlabels"]
    print("every region, decoded by label-studio-sdk, equals the endpoint's label map")

    # Label Studio registers the backend's /webhook itself when it connects it
    hooks = [h["url"] for h in ls.get(f"{args.label_studio}/api/webhooks", params={"project": pid}).json()]
    print(f"webhooks Label Studio registered: {hooks}")
    assert f"{args.endpoint}/label-studio/webhook" in hooks
    points = [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": width,
               "original_height": height, "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [classes[c]]}}
              for x, y, c in [(50.0, 10.0, 0), (50.0, 90.0, min(3, len(classes) - 1))]]
    created = ls.post(f"{args.label_studio}/api/tasks/{task['id']}/annotations", json={"result": points})
    created.raise_for_status()
    rows = []
    for _ in range(30):  # the store's Parquet parts (read with pyarrow, which Label Studio's environment has)
        rows = [r for part in sorted(Path(args.clicks_store).glob("*.parquet"))
                for r in pq.read_table(part).to_pylist() if r["image_id"] == photo.stem]
        if rows:
            break
        time.sleep(1)
    print(f"clicks stored for {photo.stem}: {[(round(r['x'], 1), round(r['y'], 1), r['cls']) for r in rows]}")
    assert len(rows) == 2
    print("Label Studio round trip: OK")


if __name__ == "__main__":
    main()
