"""How fast refusals come: the figures the test suite held as wall-clock bounds until issue 24.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/fail_fast.py        # ~2 min on 2 cores

The tests now assert what the code guarantees (the refusal comes before the slow part: no
connection, no trainer, no Tuner; a hang is pytest-timeout's failure); how long each refusal
takes is measured here, against the bound the test used to hold:

  inspect What's the Point main file (12,180 images)       <= 5 s   (tests/test_data.py)
  train --address to an address nothing listens at         <= 10 s  (tests/test_cluster.py)
  train to unwritable storage, local and S3 (2 refusals)    <= 20 s  (tests/test_cluster.py)
  train needing more than the cluster has (2 refusals)      <= 20 s  (tests/test_cluster.py)
  tune on a cluster too small for one trial                 <= 30 s  (tests/test_jobs.py)
  evaluate from an S3 that stopped answering (timeout 1 s)  <= 60 s  (tests/test_hostile_input.py)

It starts a local Ray (8 logical CPUs, as the test cluster) and a moto S3 server on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WTP_MAIN = REPO.parent / "shared" / "data" / "voc" / "whats_the_point" / "pascal2012_trainval_main.json"
TINY = ["data.synthetic.image_size=32", "data.crop_size=[32,32]", "data.synthetic.num_train=16",
        "data.synthetic.num_val=4", "optim.batch_size=2", "resources.loader_workers=0"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def refused(fn, error: type) -> None:
    try:
        fn()
    except error:
        return
    raise AssertionError(f"expected {error.__name__}")


def moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    port: list[int] = []

    def read():
        for line in proc.stderr:
            match = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if match and not port:
                port.append(int(match[1]))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not port:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("moto_server did not start")
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port[0]}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return proc, endpoint


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures: list[tuple[str, float, float]] = []  # (what, seconds, target)
    if WTP_MAIN.is_file():
        from seminar.data.inspect import inspect_clicks

        figures.append(("inspect What's the Point main file", inspect_clicks(str(WTP_MAIN)).seconds, 5))

    from cluster import ClusterUnreachable, InsufficientResources, StorageNotWritable, run_training
    from seminar.config import load_spec

    def spec(path, *extra):
        return load_spec(None, [*TINY, "optim.steps=4", f"storage.path={path}", *extra])

    s3, _ = moto()
    tmp = Path(tempfile.mkdtemp(prefix="fail-fast-"))
    import ray

    try:
        figures.append(("train --address where nothing listens", timed(
            lambda: refused(lambda: run_training(spec(tmp), address="127.0.0.1:9"), ClusterUnreachable)), 10))
        ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        (tmp / "a-file").write_text("")
        figures.append(("train to unwritable storage (local, S3)", timed(lambda: [
            refused(lambda: run_training(spec(p), address=address), StorageNotWritable)
            for p in (tmp / "a-file" / "runs", "s3://no-such-bucket-here/runs")]), 20))
        figures.append(("train needing more than the cluster has (2)", timed(lambda: [
            refused(lambda: run_training(spec(tmp, *extra), address=address), InsufficientResources)
            for extra in (["resources.cpus_per_worker=64"],
                          ["resources.replicas_per_student=8", "optim.batch_size=8"])]), 20))

        from jobs.sweep import run_sweep

        sweep = load_spec(None, [*TINY, "optim.steps=4", f"storage.path={tmp / 'runs'}", "resources.cpus_per_worker=5",
                                 "sweep.params={optim.lr: {grid: [0.001, 0.01]}}"])
        figures.append(("tune on a cluster too small for one trial", timed(
            lambda: refused(lambda: run_sweep(sweep, address=address), InsufficientResources)), 30))
        ray.shutdown()

        from typer.testing import CliRunner

        from jobs.main import app
        from seminar import storage
        from seminar.engine import write_initial_checkpoint

        import boto3

        boto3.client("s3").create_bucket(Bucket="fail-fast")
        local = tmp / "ckpt"
        write_initial_checkpoint(str(local), load_spec(None, ["data.synthetic.num_train=8", "data.synthetic.num_val=4"]))
        storage.upload_dir(local, "s3://fail-fast/ckpt")
        os.environ[storage.S3_TIMEOUT_ENV] = "1"
        os.kill(s3.pid, signal.SIGSTOP)
        try:
            result = []
            seconds = timed(lambda: result.append(CliRunner().invoke(app, ["evaluate", "s3://fail-fast/ckpt"])))
        finally:
            os.kill(s3.pid, signal.SIGCONT)
        assert result[0].exit_code == 2, result[0].output
        figures.append(("evaluate from an S3 that stopped answering", seconds, 60))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        s3.terminate()
        s3.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'refusal':<48} {'seconds':>8} {'target':>8}")
    for what, seconds, target in figures:
        print(f"{what:<48} {seconds:8.1f} {'<= ' + str(target):>8}  {'met' if seconds <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
