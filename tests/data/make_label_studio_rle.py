"""Run once with label-studio-sdk 2.1.2 installed: writes tests/data/label_studio_rle.json."""
import json
import numpy as np
from PIL import Image
from label_studio_sdk.converter.brush import mask2rle, decode_rle

def masks():
    label = np.array(Image.open("tests/data/camvid_tiny/trainannot/0001TP_006690.png").resize((120, 90), Image.NEAREST))
    yield "camvid_car_120x90", label == 8
    yield "camvid_building_120x90", label == 1
    yield "empty_7x5", np.zeros((5, 7), bool)
    yield "full_300x250", np.ones((250, 300), bool)  # one run of 300,000 values: > 2**16
    yield "two_pixels_4x2", np.array([[1, 0, 0, 1], [0, 0, 0, 0]], bool)

out = []
for name, m in masks():
    rle = mask2rle(m.astype(np.uint8) * 255)
    assert (decode_rle(rle).reshape(*m.shape, 4)[:, :, 3] == m * 255).all()
    out.append({"name": name, "height": m.shape[0], "width": m.shape[1], "rle": [int(v) for v in rle]})
json.dump({"encoder": "label_studio_sdk 2.1.2, label_studio_sdk.converter.brush.mask2rle(mask.astype(uint8) * 255)",
           "masks": out}, open("tests/data/label_studio_rle.json", "w"))
print([(o["name"], len(o["rle"])) for o in out])
