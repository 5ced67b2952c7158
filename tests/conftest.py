"""Shared test fixtures: one real S3 server and one real Ray cluster per test session.

Ray rule on these machines: never two clusters at once. Every test that needs Ray uses
`ray_cluster` (a `ray start --head` with token authentication, as new clusters have by
default) and connects to it; extra nodes join it with `ray start --address`. The S3
server starts first so that every Ray process inherits its endpoint and credentials.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable

# Tiny CPU jobs: keep torch from spawning more threads than there are cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# What the code caches (seminar.storage.cache_dir: ONNX exports, S3 checkpoints, registry
# models): kept for the session here, not in the user's ~/.cache; set before any Ray process
# starts, so that replicas share it.
CACHE = tempfile.mkdtemp(prefix="seminar-cache-")
os.environ["SEMINAR_CACHE"] = CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE, ignore_errors=True)


# Ray reads its auth mode when it is first imported, so the session's token must be in the
# environment before any test module does `import ray` (conftest is imported first).
RAY_TOKEN = secrets.token_hex(16)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen


@contextlib.contextmanager
def file_server(files: dict[str, bytes], token: str | None = None):
    """A stand-in for Label Studio's file server on loopback: serves `files` (path -> bytes) to
    requests carrying `Authorization: Token <token>` (any, when token is None); yields (base URL,
    the headers of every request)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            status = 401 if token and self.headers.get("Authorization") != f"Token {token}" else (
                200 if self.path in files else 404)
            self.send_response(status)
            body = files[self.path] if status == 200 else b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-speaking server (moto) on loopback; credentials come from the environment."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(PYTHON).parent)) or shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
        )
        yield S3Server(endpoint, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test."""
    import boto3

    name = f"test-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    return name


@dataclass
class RayCluster:
    address: str  # GCS address, for ray.init / ray start --address
    dashboard_url: str  # Jobs API
    token: str
    gcs_port: int
    metrics_url: str  # Ray's Prometheus exporter on the head node

    def add_node(self, num_cpus: int = 2, resources: str | None = None) -> None:
        """Join a second raylet to this cluster (a multi-node cluster on one machine)."""
        cmd = [PYTHON, "-m", "ray.scripts.scripts", "start", f"--address={self.address}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real Ray head on this machine, token-authenticated, shared by the whole session."""
    token = RAY_TOKEN
    gcs_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    # 8 logical CPUs on 2 cores: the test jobs are tiny, and trials/workers must fit at once.
    # `--block` keeps `ray start` in the foreground, in its own process group with every Ray
    # process it starts: the cluster is stopped through the pid we started, never by name
    # (`ray stop` would take any other Ray on the machine with it).
    head = subprocess.Popen(
        [PYTHON, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs_port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--include-dashboard=true", f"--metrics-export-port={metrics_port}",
         "--num-cpus=8", "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        for port in (gcs_port, dash_port, metrics_port):
            wait_for_port(port, timeout=180)
        cluster = RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", token, gcs_port,
                             f"http://127.0.0.1:{metrics_port}/metrics")
        yield cluster
    finally:
        import ray

        ray.shutdown()
        head.terminate()  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, 9)  # whatever did not stop, in the group we started
        except ProcessLookupError:
            pass
        # `ray stop` would also forget the cluster; without this, the next `ray.init()` on the
        # machine would try to join the dead one.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This test process connected to the shared cluster as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    return ray_cluster
