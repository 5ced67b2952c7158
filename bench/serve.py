"""What serving costs: the HTTP endpoint against the bare model, side by side in one run.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve.py
    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve.py --model deeplabv3plus_resnet18 \\
        --infer-size 256 --image 320x240 --threads 2 --requests 40

It starts its own local Ray (so it runs under the Ray lock on shared machines), serves an
untrained checkpoint of `--model` written by the training code's checkpoint writer, and
measures, on the same machine and the same torch thread count:

  latency at batch 1     p50 / p99 of sequential POST /v1/segment (a JPEG of --image, resized
                         to --infer-size, answered as a PNG label map at the original size)
                         against the raw `model(x)` forward on the resized tensor;
                         target: served p50 <= 1.2 x raw p50
  throughput             images/s with 8 and 32 concurrent clients against the offline
                         batched forward (batch --batch at the same size, no HTTP);
                         target: served >= 0.85 x offline

Both sides run interleaved in blocks (a few forwards, a few requests, ...), so that load
from other processes on a shared machine hits both alike. The HTTP clients run in this
process: on a small machine they take CPU from the replica, which the ratios include.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LATENCY_TARGET = 1.2
THROUGHPUT_TARGET = 0.85


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deeplabv3plus_resnet18")
    parser.add_argument("--infer-size", type=int, default=256, help="long side the endpoint resizes to")
    parser.add_argument("--image", default="320x240", help="uploaded image size, WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--batch", type=int, default=8, help="max batch size (served and offline)")
    parser.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the endpoint")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests for the latency figures")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client in the throughput runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_checkpoint(directory: Path, model: str) -> Path:
    from seminar.config import load_spec
    from seminar.data import build_dataset
    from seminar.engine import WorkerContext, build_student, write_checkpoint

    cfg = load_spec(None, ["method.w_ss=0", f"students=[{{model: {model}}}]", "storage.run_name=bench"])
    info = build_dataset(cfg.data, "train").info
    ctx = WorkerContext(students=[0])
    write_checkpoint(str(directory), cfg, {0: build_student(cfg, 0, info.num_classes, ctx)}, info, 0, {}, ctx)
    return directory


def test_image(width: int, height: int) -> bytes:
    from PIL import Image

    from seminar.data.datasets import render_synthetic

    image, _ = render_synthetic(np.random.default_rng(0), max(width, height), 4)
    out = io.BytesIO()
    Image.fromarray(image).resize((width, height)).save(out, format="JPEG", quality=90)
    return out.getvalue()


class RawModel:
    """The bare model in this process, on the tensor the endpoint would build from the image."""

    def __init__(self, checkpoint: Path, jpeg: bytes, args):
        import torch

        from seminar.data.transforms import normalize
        from seminar.predict import Segmenter
        from serving.imaging import decode_image, resize_long_side

        torch.set_num_threads(args.threads)
        self.model = Segmenter.load(str(checkpoint)).models[0]
        self.x = normalize(resize_long_side(decode_image(jpeg, 2**30), args.infer_size)).unsqueeze(0)
        self.batch = self.x.expand(args.batch, -1, -1, -1).contiguous()
        for _ in range(2):
            self.forward_one()
            self.forward_batch()

    def forward_one(self) -> float:
        import torch

        with torch.no_grad():
            start = time.perf_counter()
            self.model(self.x)
            return time.perf_counter() - start

    def forward_batch(self) -> float:
        import torch

        with torch.no_grad():
            start = time.perf_counter()
            self.model(self.batch)
            return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """The same model behind Ray Serve, called over loopback HTTP from this process."""

    def __init__(self, url: str, jpeg: bytes):
        self.url, self.jpeg = url, jpeg
        self.local = threading.local()
        self.batch_sizes: list[int] = []  # of every answered request, from X-Batch-Size
        self.forward_s: list[float] = []  # the forward each answer was part of, from Server-Timing

    def post(self) -> float:
        import requests

        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        start = time.perf_counter()
        answer = session.post(self.url, data=self.jpeg, headers={"Content-Type": "image/jpeg"}, timeout=300)
        answer.raise_for_status()
        self.batch_sizes.append(int(answer.headers["X-Batch-Size"]))
        timing = dict(part.split(";dur=") for part in
                      (p.split(";desc")[0].strip() for p in answer.headers["Server-Timing"].split(",")))
        self.forward_s.append(float(timing["forward"]) / 1000)
        return time.perf_counter() - start

    def images_per_s(self, clients: int, per_client: int) -> float:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda _: self.post(), range(clients)))  # warm: sessions open
            start = time.perf_counter()
            list(pool.map(lambda _: self.post(), range(clients * per_client)))
            return clients * per_client / (time.perf_counter() - start)


def measure(raw: RawModel, endpoint: Endpoint, args) -> dict:
    """Interleaved, so that load from other processes on a shared machine hits both sides alike."""
    raw_single, served_single = [], []
    blocks = 5
    for _ in range(blocks):
        raw_single += [raw.forward_one() for _ in range(args.requests // blocks)]
        served_single += [endpoint.post() for _ in range(args.requests // blocks)]
    offline_rates, served_rates, batch_sizes, forward_rates = [], {8: [], 32: []}, {8: [], 32: []}, {8: [], 32: []}
    for _ in range(2):
        for clients in (8, 32):
            offline_rates.append(args.batch / min(raw.forward_batch() for _ in range(2)))
            endpoint.batch_sizes.clear()
            endpoint.forward_s.clear()
            served_rates[clients].append(endpoint.images_per_s(clients, args.rounds))
            batch_sizes[clients] += endpoint.batch_sizes
            # images/s of the replica's forwards alone (each answer carries 1/batch of its forward)
            forward_rates[clients].append(len(endpoint.forward_s) / sum(
                f / b for f, b in zip(endpoint.forward_s, endpoint.batch_sizes)))
    return {
        "input": list(raw.x.shape),
        "raw_p50_ms": 1000 * percentile(raw_single, 50), "raw_p99_ms": 1000 * percentile(raw_single, 99),
        "served_p50_ms": 1000 * percentile(served_single, 50), "served_p99_ms": 1000 * percentile(served_single, 99),
        "offline_images_per_s": statistics.median(offline_rates),
        **{f"served_images_per_s_{c}": statistics.median(rates) for c, rates in served_rates.items()},
        # mean batch an answered request was part of
        **{f"served_mean_batch_{c}": statistics.mean(sizes) for c, sizes in batch_sizes.items()},
        **{f"replica_forward_images_per_s_{c}": statistics.median(rates) for c, rates in forward_rates.items()},
    }


def run(checkpoint: Path, jpeg: bytes, args) -> dict:
    import ray
    from ray import serve

    from seminar.config import ServingConfig
    from serving.app import ServeArgs, build_app

    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServingConfig(infer_size=args.infer_size, num_replicas=1, torch_threads=args.threads,
                            max_batch_size=args.batch, batch_pixel_budget=args.batch * args.infer_size**2,
                            batch_wait_timeout_s=args.batch_wait, max_ongoing_requests=64, max_queued_requests=-1)
        serve.run(build_app(ServeArgs(model=str(checkpoint), serving=cfg)), name="bench", route_prefix="/")
        endpoint = Endpoint(f"http://127.0.0.1:{port}/v1/segment", jpeg)
        for _ in range(3):
            endpoint.post()
        return measure(RawModel(checkpoint, jpeg, args), endpoint, args)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    args = parse_args()
    width, height = (int(v) for v in args.image.lower().split("x"))
    jpeg = test_image(width, height)
    load_before = f"{os.getloadavg()[0]:.1f}"  # other processes on a shared machine skew both sides
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        figures = run(make_checkpoint(Path(tmp) / "checkpoint", args.model), jpeg, args)

    latency_ratio = figures["served_p50_ms"] / figures["raw_p50_ms"]
    ratios = {c: figures[f"served_images_per_s_{c}"] / figures["offline_images_per_s"] for c in (8, 32)}
    height_px, width_px = figures["input"][2:]
    print(f"\nserving benchmark: {args.model}, {width}x{height} JPEG -> forward at {width_px}x{height_px}, "
          f"{args.threads} torch threads, {len(os.sched_getaffinity(0))} cores, batch {args.batch}, "
          f"batch wait {1000 * args.batch_wait:g} ms; load average before/after {load_before} / {os.getloadavg()[0]:.1f}")
    print(f"{'latency, batch 1':<34}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'  model(x), one process':<34}{figures['raw_p50_ms']:>10.1f}{figures['raw_p99_ms']:>10.1f}")
    print(f"{'  POST /v1/segment (PNG answer)':<34}{figures['served_p50_ms']:>10.1f}{figures['served_p99_ms']:>10.1f}")
    print(f"  p50 ratio {latency_ratio:.2f} (target <= {LATENCY_TARGET}: "
          f"{'met' if latency_ratio <= LATENCY_TARGET else 'MISSED'})")
    print(f"{'throughput':<34}{'images/s':>10}{'ratio':>10}")
    print(f"{f'  offline forward, batch {args.batch}':<34}{figures['offline_images_per_s']:>10.2f}")
    for clients, ratio in ratios.items():
        verdict = "met" if ratio >= THROUGHPUT_TARGET else "MISSED"
        print(f"{f'  {clients} concurrent clients':<34}{figures[f'served_images_per_s_{clients}']:>10.2f}"
              f"{ratio:>10.2f}  (target >= {THROUGHPUT_TARGET}: {verdict}; "
              f"mean batch {figures[f'served_mean_batch_{clients}']:.1f}; the replica's forwards alone: "
              f"{figures[f'replica_forward_images_per_s_{clients}']:.2f} images/s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures,
                                         "latency_ratio": latency_ratio, "throughput_ratio": ratios}, indent=2))


if __name__ == "__main__":
    main()
