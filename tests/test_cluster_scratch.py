import sys, time, ray
import numpy as np
from test_cluster import tiny_spec, fast_train_controller  # noqa
from cluster import run_training

def test_s3_timing(ray_session, s3_bucket, tmp_path):
    storage = f"s3://{s3_bucket}/runs"
    t = time.time()
    first = run_training(tiny_spec(storage, 2, 1, "storage.run_name=on-s3"), address=ray_session.address)
    print("first", time.time() - t); t = time.time()
    second = run_training(tiny_spec(storage, 4, 2, "storage.run_name=on-s3"), address=ray_session.address)
    print("second", time.time() - t); t = time.time()
    from seminar.predict import Segmenter
    segmenter = Segmenter.load(second.checkpoint)
    print("load", time.time() - t); t = time.time()
