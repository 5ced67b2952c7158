"""What serving costs: the HTTP endpoint against the bare model, side by side in one run.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve.py            # served defaults, ~5 min on 2 cores
    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve.py --runtime torch   # serve eager PyTorch
    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve.py --burst 2000      # + replica memory

It starts its own local Ray (so it runs under the Ray lock on shared machines), serves an
untrained checkpoint of `--model` (default: the CamVid study's network) written by the
training code's checkpoint writer, and measures, on the same machine and the same thread
count, three ways of answering one image:

  eager        the raw `model(x).softmax(1)` forward in this process (probabilities at the
               input size): what a user would write; the reference of every ratio
  onnx         the same network exported (seminar.export: probabilities at the decoder's
               stride 4, as served) and run by ONNX Runtime here
  served       POST /v1/segment on the endpoint (`serving.runtime`, default onnx): a JPEG
               of --image, resized to --infer-size, answered as a PNG label map at the
               original size

  latency at batch 1     p50 / p99, the three interleaved one after another per round;
                         target: served p50 <= 0.8 x eager p50
  throughput             images/s with 8 and 32 concurrent clients against the offline
                         batched eager forward (batch --batch at the same size, no HTTP);
                         target: served >= 1.2 x offline eager
  memory (--burst N)     the replica's resident memory before and after N requests from 32
                         clients; target: after within 20% of before

CPU-seconds of the in-process forwards are printed beside their wall time. It also prints
where a served request's time went, from the answers' Server-Timing header (decode, queue,
forward, encode inside the replica; the rest is HTTP and Serve's routing), and the mean
batch an answer was part of (X-Batch-Size).

The HTTP clients run in this process: on a small machine they take CPU from the replica,
which the ratios include. On a shared machine, run it twice (ratios move by about +-0.1).
Figures measured: docs/performance.md.
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

# The three arms take turns on the same cores: idle intra-op threads of the in-process arms
# (torch's OpenMP team, ONNX Runtime's pool) would spin on the cores the replica then needs.
# They sleep instead, as the replica's do (serving.omp_wait_policy). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LATENCY_TARGET = 0.8
THROUGHPUT_TARGET = 1.2
MEMORY_TARGET = 1.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deeplabv3plus_efficientnet_lite0")
    parser.add_argument("--runtime", default="onnx", choices=["onnx", "torch"], help="the endpoint's serving.runtime")
    parser.add_argument("--burst", type=int, default=0, help="requests of the memory burst (0 = none)")
    parser.add_argument("--infer-size", type=int, default=512, help="long side the endpoint resizes to")
    parser.add_argument("--image", default="640x480", help="uploaded image size, WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--batch", type=int, default=8, help="max batch size (served and offline)")
    parser.add_argument("--wait-policy", default="passive", choices=["passive", "active"],
                        help="the endpoint's serving.omp_wait_policy (idle intra-op threads sleep or spin)")
    parser.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the endpoint")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests for the latency figures")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_checkpoint(directory: Path, model: str) -> Path:
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    cfg = load_spec(None, ["method.w_ss=0", f"students=[{{model: {model}}}]", "storage.run_name=bench"])
    return Path(write_initial_checkpoint(str(directory), cfg))


def test_image(width: int, height: int) -> bytes:
    from PIL import Image

    from seminar.data.datasets import render_synthetic

    image, _ = render_synthetic(np.random.default_rng(0), max(width, height), 4)
    out = io.BytesIO()
    Image.fromarray(image).resize((width, height)).save(out, format="JPEG", quality=90)
    return out.getvalue()


class RawModel:
    """The bare model in this process, eager and exported, on the tensor the endpoint would
    build from the image."""

    def __init__(self, checkpoint: Path, jpeg: bytes, args):
        import torch

        from seminar.predict import Segmenter
        from serving.imaging import decode_image

        torch.set_num_threads(args.threads)
        eager = Segmenter.load(str(checkpoint), runtime="torch")
        network = eager.network.network  # the bare nn.Module: what a user would load and call
        self.forwards = {"eager": lambda x: network(x).softmax(1),  # model(x) at the input size, softmax included
                         # what the endpoint runs: probabilities at the decoder's stride, upsampled once later
                         "onnx": Segmenter.load(str(checkpoint), runtime="onnx", threads=args.threads).network}
        self.x = eager.model_input(decode_image(jpeg, 2**30), args.infer_size).unsqueeze(0)
        self.batch = self.x.expand(args.batch, -1, -1, -1).contiguous()
        self.cpu_s: dict[str, list[float]] = {name: [] for name in self.forwards}
        for name in self.forwards:
            for _ in range(2):
                self.forward(name, self.x)
                self.forward(name, self.batch)

    def forward(self, name: str, x) -> float:
        import torch

        with torch.no_grad():
            start, cpu = time.perf_counter(), time.process_time()
            self.forwards[name](x)
            if x.shape[0] == 1:
                self.cpu_s[name].append(time.process_time() - cpu)
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
        self.parts: list[dict[str, float]] = []  # Server-Timing parts, and the rest ("http")

    def post(self) -> float:
        import requests

        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        start = time.perf_counter()
        answer = session.post(self.url, data=self.jpeg, headers={"Content-Type": "image/jpeg"}, timeout=300)
        elapsed = time.perf_counter() - start
        answer.raise_for_status()
        self.batch_sizes.append(int(answer.headers["X-Batch-Size"]))
        # "decode;dur=2.1, queue;dur=0.3;desc=..., forward;dur=...": the replica's own account
        timing = {name: float(dur) / 1000 for name, dur in (
            part.split(";desc")[0].strip().split(";dur=") for part in answer.headers["Server-Timing"].split(","))}
        self.forward_s.append(timing["forward"])
        self.parts.append({**timing, "http": elapsed - sum(timing.values())})
        return elapsed

    def images_per_s(self, clients: int, per_client: int) -> float:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda _: self.post(), range(clients)))  # warm: sessions open
            start = time.perf_counter()
            list(pool.map(lambda _: self.post(), range(clients * per_client)))
            return clients * per_client / (time.perf_counter() - start)


def measure(raw: RawModel, endpoint: Endpoint, args) -> dict:
    """Interleaved, so that load from other processes on a shared machine hits every side alike."""
    raw_single, onnx_single, served_single = [], [], []
    endpoint.parts.clear()
    for _ in range(args.requests):  # one of each per round: a burst of outside load hits all three
        raw_single.append(raw.forward("eager", raw.x))
        onnx_single.append(raw.forward("onnx", raw.x))
        served_single.append(endpoint.post())
    parts = {name: 1000 * statistics.median(p[name] for p in endpoint.parts) for name in endpoint.parts[0]}
    offline_rates, onnx_rates, served_rates, batch_sizes, forward_rates = [], [], {8: [], 32: []}, {8: [], 32: []}, {8: [], 32: []}
    for _ in range(2):
        for clients in (8, 32):
            offline_rates.append(args.batch / min(raw.forward("eager", raw.batch) for _ in range(2)))
            onnx_rates.append(args.batch / min(raw.forward("onnx", raw.batch) for _ in range(2)))
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
        "onnx_p50_ms": 1000 * percentile(onnx_single, 50), "onnx_p99_ms": 1000 * percentile(onnx_single, 99),
        # per-round ratios: their spread says how much the machine moved the figures
        "served_over_raw": [s / r for s, r in zip(served_single, raw_single)],
        "onnx_over_raw": [o / r for o, r in zip(onnx_single, raw_single)],
        "cpu_ms": {name: 1000 * statistics.median(v) for name, v in raw.cpu_s.items()},
        "served_p50_ms": 1000 * percentile(served_single, 50), "served_p99_ms": 1000 * percentile(served_single, 99),
        # where a served request's time went (medians, ms): the replica's Server-Timing parts
        # (decode, queue, forward, encode) and the rest, HTTP and Serve's routing ("http")
        "served_parts_ms": parts,
        "offline_images_per_s": statistics.median(offline_rates),
        "onnx_offline_images_per_s": statistics.median(onnx_rates),
        **{f"served_images_per_s_{c}": statistics.median(rates) for c, rates in served_rates.items()},
        # mean batch an answered request was part of
        **{f"served_mean_batch_{c}": statistics.mean(sizes) for c, sizes in batch_sizes.items()},
        **{f"replica_forward_images_per_s_{c}": statistics.median(rates) for c, rates in forward_rates.items()},
    }


def replica_rss_mb() -> float:
    """Resident memory of the one replica (its process, from Ray's state API)."""
    from ray.util.state import list_actors

    (replica,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica:bench:")]
    for line in Path(f"/proc/{replica.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def burst_memory(endpoint: Endpoint, requests: int) -> dict:
    before = replica_rss_mb()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: endpoint.post(), range(requests)))
    return {"burst_requests": requests, "replica_rss_before_mb": before, "replica_rss_after_mb": replica_rss_mb()}


def run(checkpoint: Path, jpeg: bytes, args) -> dict:
    import ray
    from ray import serve

    from seminar.config import ServingConfig
    from serving.app import ServeArgs, build_app

    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServingConfig(infer_size=args.infer_size, num_replicas=1, torch_threads=args.threads, runtime=args.runtime,
                            max_batch_size=args.batch, batch_pixel_budget=args.batch * args.infer_size**2,
                            batch_wait_timeout_s=args.batch_wait, max_ongoing_requests=64, max_queued_requests=-1,
                            omp_wait_policy=args.wait_policy)
        serve.run(build_app(ServeArgs(model=str(checkpoint), serving=cfg)), name="bench", route_prefix="/")
        endpoint = Endpoint(f"http://127.0.0.1:{port}/v1/segment", jpeg)
        for _ in range(3):
            endpoint.post()
        figures = measure(RawModel(checkpoint, jpeg, args), endpoint, args)
        if args.burst:
            figures.update(burst_memory(endpoint, args.burst))
        return figures
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
          f"served by {args.runtime} ({args.wait_policy} waits), {args.threads} threads, {len(os.sched_getaffinity(0))} cores, batch {args.batch}, "
          f"batch wait {1000 * args.batch_wait:g} ms; load average before/after {load_before} / {os.getloadavg()[0]:.1f}")
    print(f"{'latency, batch 1':<34}{'p50 ms':>10}{'p99 ms':>10}{'cpu ms':>10}")
    cpu = figures["cpu_ms"]
    print(f"{'  eager model(x), one process':<34}{figures['raw_p50_ms']:>10.1f}{figures['raw_p99_ms']:>10.1f}{cpu['eager']:>10.1f}")
    print(f"{'  onnx runtime, one process':<34}{figures['onnx_p50_ms']:>10.1f}{figures['onnx_p99_ms']:>10.1f}{cpu['onnx']:>10.1f}")
    print(f"{'  POST /v1/segment (PNG answer)':<34}{figures['served_p50_ms']:>10.1f}{figures['served_p99_ms']:>10.1f}")
    print("    of which (medians, ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in figures["served_parts_ms"].items()))
    for name, key in (("onnx / eager", "onnx_over_raw"), ("served / eager", "served_over_raw")):
        values = figures[key]
        print(f"  {name}: median of per-round ratios {statistics.median(values):.2f} "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} rounds)")
    print(f"  p50 ratio served / eager {latency_ratio:.2f} (target <= {LATENCY_TARGET}: "
          f"{'met' if latency_ratio <= LATENCY_TARGET else 'MISSED'})")
    print(f"{'throughput':<34}{'images/s':>10}{'ratio':>10}")
    print(f"{f'  offline eager forward, batch {args.batch}':<34}{figures['offline_images_per_s']:>10.2f}")
    print(f"{f'  offline onnx forward, batch {args.batch}':<34}{figures['onnx_offline_images_per_s']:>10.2f}"
          f"{figures['onnx_offline_images_per_s'] / figures['offline_images_per_s']:>10.2f}")
    for clients, ratio in ratios.items():
        verdict = "met" if ratio >= THROUGHPUT_TARGET else "MISSED"
        print(f"{f'  {clients} concurrent clients':<34}{figures[f'served_images_per_s_{clients}']:>10.2f}"
              f"{ratio:>10.2f}  (target >= {THROUGHPUT_TARGET}: {verdict}; "
              f"mean batch {figures[f'served_mean_batch_{clients}']:.1f}; the replica's forwards alone: "
              f"{figures[f'replica_forward_images_per_s_{clients}']:.2f} images/s)")
    if args.burst:
        before, after = figures["replica_rss_before_mb"], figures["replica_rss_after_mb"]
        print(f"memory: replica {before:.0f} MB before, {after:.0f} MB after {args.burst} requests from 32 clients "
              f"({after / before:.2f}x; target <= {MEMORY_TARGET}: {'met' if after / before <= MEMORY_TARGET else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures,
                                         "latency_ratio": latency_ratio, "throughput_ratio": ratios}, indent=2))


if __name__ == "__main__":
    main()
