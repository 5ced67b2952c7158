"""Shared test fixtures: one real S3 server and one real Ray cluster per test session.

Ray rule on these machines: never two clusters at once. Every test that needs Ray uses
`ray_cluster` (a `ray start --head` with token authentication, as new clusters have by
default) and connects to it; extra nodes join it with `ray start --address`. The S3
server starts first so that every Ray process inherits its endpoint and credentials.

Tiers: a test that uses Ray, Serve, Chromium or a subprocess server (one of SLOW_FIXTURES,
directly or through another fixture) is marked `slow` at collection, so a new test is
classified by what it uses; `make test-fast` runs the rest (`-m "not slow"`, on every core
with pytest-xdist: a fast test shares nothing with another, not even a process). A test that
reaches one of those fixtures only at run time (`request.getfixturevalue`) must be visible
at collection: a parameter whose value names the fixture (or is "s3", for `s3_bucket`)
marks it; one that is not marked fails, naming the fixture, instead of slowing the fast tier.

Order: `--reversed` runs the collected tests in reverse order; `-p random_order
--random-order` (pytest-random-order) shuffles them. The suite must pass either way.
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
import random
import time
from dataclasses import dataclass, field
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


# ---- tiers -------------------------------------------------------------------------------

# fixture -> what it starts; a test that uses one (directly or through other fixtures) is slow
SLOW_FIXTURES = {
    "ray_cluster": "a Ray cluster", "ray_session": "a Ray cluster",
    "s3_server": "a subprocess S3 server (moto)", "s3_bucket": "a subprocess S3 server (moto)",
    "chromium": "Chromium",
    # Serve apps (tests/test_serving.py); they stand on ray_session too
    "server": "Ray Serve", "committee_server": "Ray Serve",
}
# a parameter value that stands for a fixture the test requests at run time
PARAM_FIXTURES = {"s3": "s3_bucket"}
CURRENT_ITEM: list = [None]  # the test being set up or run (the run-time guard below)


def pytest_addoption(parser):
    parser.addoption("--reversed", action="store_true", help="run the collected tests in reverse order")


def _slow_reason(item) -> str | None:
    used = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, str):
            used.add(PARAM_FIXTURES.get(value, value))
    found = sorted(used & SLOW_FIXTURES.keys())
    return f"uses {', '.join(found)}" if found else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _slow_reason(item)
        if reason and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow(reason=reason))
    if config.getoption("--reversed"):
        items.reverse()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    CURRENT_ITEM[0] = item
    yield


def require_slow_tier(fixture: str) -> None:
    """Called by the slow fixtures: a fast-tier test that reaches one at run time fails."""
    item = CURRENT_ITEM[0]
    if item is not None and not item.get_closest_marker("slow"):
        pytest.fail(f"{item.nodeid} reached fixture {fixture!r} ({SLOW_FIXTURES[fixture]}) at run time but is "
                    "in the fast tier: request it as an argument, or parametrize with its name "
                    "(tests/conftest.py, SLOW_FIXTURES)", pytrace=False)


# ---- isolation -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that sets torch's thread count (torch.set_num_threads) does not pass it on: later
    numeric comparisons run with the count the session started with."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        if before is None:
            before = int(os.environ.get("OMP_NUM_THREADS", "1"))
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# Ports for servers that must be told one (Ray, Serve, moto's CLI takes 0 but Ray does not):
# picked outside the kernel's ephemeral range (outgoing connections take ports from there,
# and could take a port between our pick and the server's bind) and outside Ray's worker
# ports (10002-19999 by default); a port is handed out once per session.
_PORT_RANGE = (20000, 32000)
_ports_given: set[int] = set()


def free_port() -> int:
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*_PORT_RANGE)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition()` until it returns something truthy (returned); a generous `timeout`
    is a hang guard, not a measurement: past it, fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout, f"nothing listens on 127.0.0.1:{port}", interval=0.1)


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    # called with each line of moto's request log (from its log thread), e.g. to act on an upload
    on_request: list = field(default_factory=list)


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
    """A real S3-speaking server (moto) on loopback, on a port it binds itself (port 0, read
    back from its startup line); credentials come from the environment."""
    require_slow_tier("s3_server")
    exe = shutil.which("moto_server", path=str(Path(PYTHON).parent)) or shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    listeners: list = []

    def read_log():  # the port, then the request log (drained: a full pipe would stall the server)
        for line in proc.stderr:
            if not found and "Running on http://127.0.0.1:" in line:
                found.append(int(line.rsplit(":", 1)[1].split("/")[0]))
            for listener in list(listeners):
                listener(line)

    threading.Thread(target=read_log, daemon=True).start()
    try:
        port = wait_until(lambda: found[0] if found else proc.poll() is not None and -1, 120,
                          "moto_server did not say its port")
        if port == -1:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
        )
        yield S3Server(endpoint, proc, listeners)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test."""
    import boto3

    require_slow_tier("s3_bucket")

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

    def add_node(self, num_cpus: int = 2, resources: str | None = None, env: dict[str, str] | None = None) -> None:
        """Join a second raylet to this cluster (a multi-node cluster on one machine); its
        workers see `env` (e.g. a SEMINAR_CACHE of its own, as another machine's disk)."""
        cmd = [PYTHON, "-m", "ray.scripts.scripts", "start", f"--address={self.address}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        subprocess.run(cmd, check=True, capture_output=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real Ray head on this machine, token-authenticated, shared by the whole session."""
    require_slow_tier("ray_cluster")
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
        head.terminate()  # `ray start --block` stops its processes on SIGTERM, one by one (> 10 s after the suite):
        try:  # the session is over, nothing of the cluster is kept, so not waited for long
            head.wait(timeout=3)
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

    require_slow_tier("ray_session")
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    return ray_cluster


def serve_running() -> bool:
    """Whether this cluster has a Serve instance (its controller actor), as far as this driver sees."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def wait_serve_gone(timeout: float = 300) -> None:
    """One Serve per cluster: a test that starts one first waits until another test's (or a
    command's) instance has shut down; `serve shutdown` and Ctrl-C end it asynchronously."""
    wait_until(lambda: not serve_running(), timeout, "a Serve instance still runs on the test cluster",
               interval=0.5)
