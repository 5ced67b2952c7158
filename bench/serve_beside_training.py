"""`seminar serve` on a busy machine: its start-up and a request burst, alone and beside a
training run (`seminar train --in-process`, the default job, running the whole time).

For each condition (alone, beside training; interleaved over `--repeats`):
  start-up   seconds from launching `seminar serve RUN` (a local Ray, default settings) to
             its "serving ... at" line; target (issue 26): within its --startup-timeout
             (default 600 s), no exit;
  burst      `--burst` POST /v1/segment from 32 threads, 10% malformed bodies; a 503 is
             retried after its Retry-After, as a client should. Target: every well-formed
             request answered 200 in the end, every malformed one a 4xx, no other 5xx, no 503
             without Retry-After, none lost (no connection error).

It starts its own local Ray: run it under the Ray lock on a shared machine.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve_beside_training.py     # ~6 min on 2 cores
    flock /tmp/seminar-ray.lock .venv/bin/python bench/serve_beside_training.py --burst 500 --repeats 2
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SEMINAR = [sys.executable, "-m", "jobs.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_training(runs: str) -> subprocess.Popen:
    """The default job, long enough to outlast the measurement; returns once it trains."""
    proc = subprocess.Popen([*SEMINAR, "train", "--in-process", "--set", f"storage.path={runs}", "--set",
                             "storage.run_name=busy", "--set", "optim.steps=100000", "--set", "schedule.log_every=1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = Path(runs) / "busy" / "metrics.jsonl"
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"the training run exited with {proc.returncode}")
            time.sleep(1)
    except BaseException:
        stop(proc, signal.SIGTERM)
        raise
    return proc


def start_serve(model: str, port: int) -> tuple[subprocess.Popen, float, list[str]]:
    """`seminar serve` and the seconds until it says it serves (or its exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen([*SEMINAR, "serve", model, "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "serving " in line and " at http" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait()
    except BaseException:
        stop(proc)
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"seminar serve exited with {proc.returncode}:\n{''.join(lines)}")
    return proc, time.perf_counter() - start, lines


def burst(port: int, count: int) -> collections.Counter:
    """`count` requests from 32 threads, every 10th malformed; 503s retried after Retry-After."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save(buffer, "PNG")
    good, bad = buffer.getvalue(), b"\x89PNG\r\n\x1a\n not really an image"
    outcome: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        body = bad if i % 10 == 0 else good
        kind = "malformed" if i % 10 == 0 else "well-formed"
        retries = 0
        while True:
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/segment", data=body,
                                  headers={"Content-Type": "image/png"}, timeout=600)
            except requests.RequestException as e:
                with lock:
                    outcome[f"{kind}: lost ({type(e).__name__})"] += 1
                return
            if r.status_code == 503 and "retry-after" in r.headers:
                retries += 1
                time.sleep(float(r.headers["retry-after"]))
                continue
            with lock:
                outcome[f"{kind}: {r.status_code}"] += 1
                outcome["503 retried"] += retries
            return

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(count)))
    return outcome


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_runs = f"{tmp}/model"
        subprocess.run([*SEMINAR, "train", "--in-process", "--set", f"storage.path={model_runs}", "--set",
                        "storage.run_name=model", "--set", "optim.steps=2", "--set", "schedule.checkpoint_every=2",
                        "--set", "schedule.eval_every=2"], cwd=REPO, check=True, capture_output=True, timeout=1800)
        for repeat in range(args.repeats):
            for condition in ("alone", "beside training"):
                training = start_training(f"{tmp}/busy-{repeat}") if condition == "beside training" else None
                try:
                    port = free_port()
                    server, seconds, _ = start_serve(f"{model_runs}/model", port)
                    try:
                        t0 = time.perf_counter()
                        outcome = burst(port, args.burst)
                        burst_s = time.perf_counter() - t0
                    finally:
                        stop(server)
                finally:
                    if training is not None:
                        stop(training, signal.SIGTERM)
                well = sum(v for k, v in outcome.items() if k.startswith("well-formed"))
                ok = outcome["well-formed: 200"] == well and not any(
                    ("lost" in k or k.endswith(": 500") or k.endswith(": 503")) for k in outcome)
                print(f"repeat {repeat} {condition}: serve started in {seconds:.1f} s; burst of {args.burst} in "
                      f"{burst_s:.1f} s: {dict(sorted(outcome.items()))} -> "
                      f"{'every well-formed request answered' if ok else 'MISSED'}", flush=True)


if __name__ == "__main__":
    main()
