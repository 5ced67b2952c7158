"""`seminar serve` end to end: a real command, deploying onto the session's Ray cluster.

Runs after test_serving.py has shut its Serve instance down (one Serve per cluster).
The command is stopped with Ctrl-C (SIGINT, by its pid) and must shut Serve down itself.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import requests
from PIL import Image

from conftest import REPO, free_port
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

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while needle not in self.text:
            if self.process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no {needle!r} from seminar serve (exit {self.process.poll()}):\n{self.text}")
            time.sleep(0.2)


def test_seminar_serve_command(ray_session, tmp_path):
    from ray import serve

    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    port = free_port()
    command = [sys.executable, "-m", "jobs.main", "serve", str(checkpoint), "--address", ray_session.address,
               "--port", str(port), "--replicas", "1", "--set", "infer_size=64", "--set", "torch_threads=1"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
        process.send_signal(signal.SIGINT)  # Ctrl-C: the command shuts Serve down
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            serve.shutdown()
            raise
    output.join(timeout=10)
    assert process.returncode == 0, output.text
    # Serve is gone: nothing answers on the port any more.
    try:
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        still_up = True
    except requests.ConnectionError:
        still_up = False
    assert not still_up
