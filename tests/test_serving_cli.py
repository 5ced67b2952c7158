"""`seminar serve` end to end: a real command, deploying onto the session's Ray cluster.

One Serve per cluster: each test waits until no other Serve instance runs (another test's,
in any order) before it starts one, and until its own is gone before it ends. The command is
stopped with Ctrl-C (SIGINT, by its pid) and must shut Serve down itself.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import REPO, free_port, serve_running, wait_serve_gone, wait_until
from test_serving_units import encode, make_checkpoint


class OutputReader(threading.Thread):
    """Collects a process's output lines as they come (so the test can wait for one)."""

    def __init__(self, process: subprocess.Popen):
        super().__init__(daemon=True)
        self.process, self.lines = process, []
        self.start()

    def run(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while needle not in self.text:
            if self.process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no {needle!r} from seminar serve (exit {self.process.poll()}):\n{self.text}")
            time.sleep(0.2)


def test_a_start_up_past_its_timeout_is_one_line_and_shuts_serve_down(ray_session, tmp_path):
    """--startup-timeout far shorter than any start-up: the command gives up with one line,
    exit 1, no traceback, and Serve is shut down (nothing half-started is left)."""
    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    wait_serve_gone()
    proc = subprocess.run([sys.executable, "-m", "jobs.main", "serve", str(checkpoint), "--address",
                           ray_session.address, "--port", str(free_port()), "--replicas", "1",
                           "--startup-timeout", "0.01"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [  # among Ray's own log lines
        "error: Serve did not start within 0.01 s (--startup-timeout; a busy machine starts slower): stopped"]
    assert "Traceback" not in proc.stdout + proc.stderr
    wait_serve_gone()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_seminar_serve_command(ray_session, tmp_path, stop):
    from ray import serve

    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    wait_serve_gone()
    port = free_port()
    command = [sys.executable, "-m", "jobs.main", "serve", str(checkpoint), "--address", ray_session.address,
               "--port", str(port), "--replicas", "1", "--set", "infer_size=64", "--set", "torch_threads=1"]
    # faulthandler: a command that does not stop is aborted (SIGABRT) and says where each thread was
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment)
    output = OutputReader(process)
    try:
        output.wait_for("serving serving-test@0 at http://127.0.0.1:")  # printed once the app is ready
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()["ready"] is True
        image = np.zeros((40, 60, 3), np.uint8)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/segment", data=encode(image),
                               headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "serving-test@0"
        assert Image.open(io.BytesIO(answer.content)).size == (60, 40)
        assert requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()["inference"]["infer_size"] == 64
    finally:
        status = Path(f"/proc/{process.pid}/status")  # for a failure: what the command blocks and ignores
        masks = [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
        process.send_signal(stop)  # Ctrl-C or SIGTERM: the command shuts Serve down
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            output.join(timeout=10)
            serve.shutdown()
            raise AssertionError(f"seminar serve did not stop on {stop.name} within 300 s ({masks}):\n"
                                 f"{output.text[-20000:]}")
    output.join(timeout=10)
    assert process.returncode == 0, output.text
    # Serve is gone: its controller, and nothing answers on the port any more.
    assert not serve_running()

    def port_closed() -> bool:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except requests.ConnectionError:
            return True
        return False

    wait_until(port_closed, 120, f"something still answers on port {port}", interval=1)


def test_shipped_serve_config_deploys_with_rays_own_cli(ray_session, tmp_path):
    """A checkpoint published to a registry, then `serve deploy serving/serve_config.yaml`
    (Ray's own CLI) onto the session's head: the app answers a segmentation. The shipped
    file is used as shipped but for the port (a free one) and the model (the registry made
    here, by absolute path: replicas do not run in the repository)."""
    import yaml
    from typer.testing import CliRunner

    from jobs.main import app

    registry = tmp_path / "runs" / "registry"
    published = CliRunner().invoke(app, ["models", "publish", str(make_checkpoint(tmp_path / "checkpoint")),
                                         "--name", "seminar", "--registry", str(registry)])
    assert published.exit_code == 0, published.output
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = str(registry / "seminar")
    shipped = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    assert shipped["applications"][0]["args"]["model"] == "runs/registry/seminar"  # what the edit replaced
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    serve_cli = [os.path.join(os.path.dirname(sys.executable), "serve")]
    wait_serve_gone()
    deployed = subprocess.run([*serve_cli, "deploy", str(path), "--address", ray_session.dashboard_url],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    try:
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        def ready() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json().get("ready") is True
            except (requests.RequestException, ValueError):  # the proxy is up before the app
                return False

        try:
            wait_until(ready, 600, "the deployed app is not ready", interval=2)
        except AssertionError as e:
            status = subprocess.run([*serve_cli, "status", "--address", ray_session.dashboard_url],
                                    capture_output=True, text=True).stdout
            raise AssertionError(f"{e}\n{status}") from None
        answer = requests.post(f"http://127.0.0.1:{port}/v1/segment", data=encode(np.zeros((40, 60, 3), np.uint8)),
                               headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "seminar/1"
        assert Image.open(io.BytesIO(answer.content)).size == (60, 40)
    finally:
        subprocess.run([*serve_cli, "shutdown", "--address", ray_session.dashboard_url, "--yes"],
                       capture_output=True, timeout=300)
        wait_serve_gone()  # `serve shutdown` returns before the instance is gone

