"""Slow senders beside normal traffic: how long a normal request waits, router settings side by side.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/slow_clients.py            # ~1.5 min on 2 cores
    flock /tmp/seminar-ray.lock .venv/bin/python bench/slow_clients.py --rounds 5 --slow 200

It starts its own local Ray and serves a small untrained checkpoint with the endpoint test's
limits (one replica, 16 requests held, 32 queued, body_timeout_s 3, 8 slow uploads). Per round
and per router variant (interleaved: A B A B ...), --slow clients each announce 100 kB and send
10 bytes, then 10 normal requests are sent one after another, each retried after a 503 as its
Retry-After says. It prints, per variant, the median and range over the rounds of the longest
normal wait, and what the slow clients were answered.

Why: Serve's router holds requests that find every replica slot taken and polls the replica
again with a backoff that grows to `RequestRouterConfig.max_backoff_s` (0.5 s by default),
admitting two requests per replica per poll, so the queue behind a flood drains at ~4
requests/s. The variants are that ceiling (the app sets serving.app.ROUTER_MAX_BACKOFF_S).

Measured (2 cores, beside a CamVid training run using both; 3 rounds each, longest normal wait):
  before (every crowded body got 1 s, router 0.5 s)   5.8 s (5.1-6.3)
  router max_backoff_s 0.05 alone                     4.4 s (4.1-5.3)
  + a crowded body may not pause > 0.25 s, router 0.5 s   3.5 s (2.3-5.1)
  + router max_backoff_s 0.05 (the app's setting)     1.8 s (1.7-1.9)
every round: 8 slow clients 408, 92 503.

Target (held by tests/test_serving.py as an 8 s bound until issue 24; the test now asserts
only that every request is answered): the longest normal wait with the app's router setting
<= BODY_TIMEOUT_S + 5 s, printed as met or MISSED.
"""

from __future__ import annotations

import argparse
import collections
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve import free_port, make_checkpoint, test_image  # noqa: E402

BODY_TIMEOUT_S = 3.0
WAIT_TARGET_S = BODY_TIMEOUT_S + 5  # longest normal wait beside the flood


def flood(port: int, prefix: str, slow: int, body: bytes) -> tuple[float, collections.Counter]:
    """(longest normal wait, the slow clients' statuses)."""
    host, url = "127.0.0.1", f"http://127.0.0.1:{port}{prefix}"
    head = (f"POST {prefix}/v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    conns = []
    for _ in range(slow):
        conn = socket.create_connection((host, port), timeout=60)
        conn.sendall(head + b"\xff\xd8\xff\xe0" + b"\x00" * 6)
        conns.append(conn)
    waits = []
    try:
        for _ in range(10):
            start = time.perf_counter()
            while True:
                answer = requests.post(f"{url}/v1/segment", data=body, headers={"Content-Type": "image/jpeg"},
                                       timeout=60)
                if answer.status_code != 503:
                    break
                time.sleep(float(answer.headers["retry-after"]))
            waits.append(time.perf_counter() - start)
        statuses = collections.Counter()
        for conn in conns:
            line = conn.makefile("rb").readline()  # the status line, or b"" if closed unanswered
            statuses[int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None] += 1
    finally:
        for conn in conns:
            conn.close()
    return max(waits), statuses


def prefix(backoff: float) -> str:
    return f"/b{backoff:g}".replace(".", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=int, default=100, help="slow clients per flood")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backoffs", type=float, nargs="+", default=[0.5, 0.05],
                        help="RequestRouterConfig.max_backoff_s of each variant")
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from seminar.config import ServingConfig
    from serving.app import SegmentationDeployment, ServeArgs, deployment_options

    body = test_image(64, 48)
    cfg = ServingConfig(infer_size=64, num_replicas=1, max_ongoing_requests=16, max_queued_requests=32,
                        torch_threads=1, body_timeout_s=BODY_TIMEOUT_S, max_slow_uploads=8, retry_after_s=1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "checkpoint", "deeplabv3plus_resnet18")
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results: dict[float, list] = {b: [] for b in args.backoffs}
        try:
            for backoff in args.backoffs:
                options = deployment_options(cfg) | {"request_router_config": RequestRouterConfig(max_backoff_s=backoff)}
                app = SegmentationDeployment.options(**options).bind(ServeArgs(model=str(checkpoint), serving=cfg))
                serve.run(app, name=prefix(backoff)[1:], route_prefix=prefix(backoff))
            for round_ in range(args.rounds):
                for backoff in args.backoffs:
                    time.sleep(BODY_TIMEOUT_S)  # a fresh flood (the crowd rule lasts body_timeout_s)
                    wait, statuses = flood(port, prefix(backoff), args.slow, body)
                    results[backoff].append((wait, statuses))
                    print(f"round {round_} max_backoff_s {backoff:g}: longest normal wait {wait:.1f} s; "
                          f"slow clients {dict(statuses)}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n{args.slow} slow clients, {args.rounds} rounds: longest normal wait, median (min-max)")
    for backoff, rounds in results.items():
        waits = [w for w, _ in rounds]
        verdict = "met" if max(waits) <= WAIT_TARGET_S else "MISSED"
        print(f"  max_backoff_s {backoff:<5g} {statistics.median(waits):5.1f} s ({min(waits):.1f}-{max(waits):.1f})"
              f"  target: longest <= {WAIT_TARGET_S:g} s: {verdict}")


if __name__ == "__main__":
    main()
