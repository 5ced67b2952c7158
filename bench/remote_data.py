"""Training data from S3 against local disk: the data time of a step with a cold and a warm
node cache, and requests per image.

A CamVid subset (the first `--images` training images of ../shared/data/camvid with their
masks) is read from local disk and from a real S3 server on loopback (moto), three ways,
interleaved in every repetition so that drift hits them alike:

  local   the folder on disk;
  cold    s3://, an empty SEMINAR_CACHE (a fresh node: every file fetched once);
  warm    s3://, the cache the cold pass filled (a later epoch, or a rerun on the node).

Each pass builds the dataset (the spec checks' work: one listing, the split file) and draws
every batch of one epoch exactly as training does (`StepBatches`: decode, load_scale, views,
clicks), in the loop (loader_workers=0, so the figure is the data time a step would wait for
without the loader's prefetch). Reported: median seconds per step (min-max), CPU-seconds, the
ratio to local, and the S3 requests the pass made per image (moto's request log). Target
(issue 25): warm <= 1.1x local; cold as measured.

    .venv/bin/python bench/remote_data.py                 # 48 images, 3 repetitions: ~3 min on 2 cores
    .venv/bin/python bench/remote_data.py --images 96 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, list[str]]]:
    """moto_server on a port it picks, stopped however the block ends; (endpoint, its request
    log lines, collected as they come)."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    port: list[int] = []
    log: list[str] = []

    def read():
        for line in proc.stderr:
            if not port and "Running on http://127.0.0.1:" in line:
                port.append(int(line.rsplit(":", 1)[1].split("/")[0]))
            log.append(line)

    try:
        threading.Thread(target=read, daemon=True).start()
        for _ in range(600):
            if port or proc.poll() is not None:
                break
            time.sleep(0.1)
        if not port:
            raise RuntimeError(f"moto_server did not start (exit {proc.poll()})")
        yield f"http://127.0.0.1:{port[0]}", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def subset(images: int, where: Path) -> Path:
    """The first `images` lines of CamVid's train list, their files, and val.txt naming one."""
    lines = (CAMVID / "train.txt").read_text().splitlines()[:images]
    for line in lines:
        for listed in line.split():
            rel = Path(*Path(listed).parts[-2:])
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CAMVID / rel, where / rel)
    (where / "train.txt").write_text("\n".join(lines) + "\n")
    (where / "val.txt").write_text(lines[0] + "\n")
    return where


def one_pass(root: str, cache: str, batch_size: int) -> dict[str, float]:
    """Build the training set at `root` and draw one epoch of batches; seconds per step."""
    from seminar.config import load_spec
    from seminar.data import SeminarViews, build_dataset
    from seminar.data import files
    from seminar.engine import StepBatches

    os.environ["SEMINAR_CACHE"] = cache
    files._listing.cache_clear()  # as a new process would: list once
    cfg = load_spec(REPO / "jobs" / "configs" / "camvid.yaml", [f"data.root={root}", f"optim.batch_size={batch_size}"])
    cpu0, start = time.process_time(), time.perf_counter()
    dataset = build_dataset(cfg.data, cfg.data.train_split)
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=0)
    steps = len(dataset) // batch_size
    batches = StepBatches(dataset, views, [0, 1], batch_size, 0, 0, 1, 0, 0, steps)
    for i in range(steps):
        batches[i]
    return {"s_per_step": (time.perf_counter() - start) / steps, "cpu_per_step": (time.process_time() - cpu0) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import boto3

    results: dict[str, list[dict[str, float]]] = {"local": [], "cold": [], "warm": []}
    requests: list[float] = []
    warm_requests: list[int] = []
    with moto_server() as (endpoint, log), tempfile.TemporaryDirectory() as tmp:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        from seminar import storage

        local = subset(args.images, Path(tmp) / "camvid")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        storage.upload_dir(local, "s3://bench/camvid")
        for r in range(args.repeats):
            cache = str(Path(tmp) / f"cache-{r}")
            results["local"].append(one_pass(str(local), cache, args.batch_size))
            seen = len(log)
            results["cold"].append(one_pass("s3://bench/camvid", cache, args.batch_size))
            methods = collections.Counter(m[1] for line in log[seen:] if (m := re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) /', line)))
            requests.append(len(log[seen:]) / args.images)
            seen = len(log)
            results["warm"].append(one_pass("s3://bench/camvid", cache, args.batch_size))
            warm_requests.append(len(log[seen:]))
            print(f"repetition {r + 1}: " + ", ".join(f"{k} {v[-1]['s_per_step']:.3f} s/step" for k, v in results.items())
                  + f"; cold: {requests[-1] * args.images:.0f} requests {dict(methods)}; "
                  f"warm: {warm_requests[-1]} requests", flush=True)

    local_median = statistics.median(x["s_per_step"] for x in results["local"])
    print(f"\n{args.images} CamVid images (camvid.yaml views, batch {args.batch_size}), {args.repeats} repetitions, "
          "medians (min-max):")
    for name, runs in results.items():
        wall = [x["s_per_step"] for x in runs]
        cpu = statistics.median(x["cpu_per_step"] for x in runs)
        print(f"  {name:5s} {statistics.median(wall):.3f} s/step ({min(wall):.3f}-{max(wall):.3f}), "
              f"cpu {cpu:.3f} s/step, {statistics.median(wall) / local_median:.2f}x local")
    print(f"  requests per image, cold pass: {statistics.median(requests):.2f} (an image and its mask: 2 files, "
          "each a HEAD (pyarrow asks the size) and a GET); "
          f"warm pass: {statistics.median(warm_requests)} requests in all (the listing)")


if __name__ == "__main__":
    main()
