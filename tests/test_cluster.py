"""The Ray cluster layer: seminar learning with one student per Ray Train worker.

Tiny synthetic jobs (32×32 images, batch 2, a handful of steps) on the session's Ray
cluster (`tests/conftest.py`); the multi-node test adds a node and removes it again.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import ray
from ray.train import Checkpoint, UserCallback
from rich.console import Console

from cluster import ClusterUnreachable, InsufficientResources, StorageNotWritable, build_trainer, run_training
from cluster.object_store import ExchangeBoard, ExchangeTimeout, RayExchange
from cluster.trainer import checkpoint_parts
from conftest import wait_until
from seminar import checkpoint, storage
from seminar.config import load_spec
from seminar.engine import write_initial_checkpoint
from seminar.exchange import CompactPrediction, InProcessExchange
from seminar.history import read_history

TINY = [
    "data.synthetic.image_size=32", "data.crop_size=[32,32]", "data.synthetic.num_train=16",
    "data.synthetic.num_val=4", "optim.batch_size=2", "schedule.log_every=1", "resources.loader_workers=0",
    # Pseudo-labels on every pixel from step 0, so that loss_ss depends on what peers sent.
    "method.ss_start=0", "method.rampup_steps=0", "method.tau=0",
    # Two small students (3.5 M parameters each; seeds and augmentation differ): a
    # checkpoint is ~60 MB instead of ~300 MB.
    "students.0.model=deeplabv3plus_mobilenetv2", "students.0.decoder_channels=32",
    "students.1.decoder_channels=32",
]


@pytest.fixture(autouse=True)
def fast_train_controller(monkeypatch):
    """Ray Train's controller collects reports every 2 s; a tiny step takes 0.3 s. The
    driver propagates this to the controllers it starts."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")


def tiny_spec(storage_path, steps=4, checkpoint_every=2, *extra):
    return load_spec(None, [*TINY, f"optim.steps={steps}", f"schedule.eval_every={steps}",
                            f"schedule.checkpoint_every={checkpoint_every}", f"storage.path={storage_path}", *extra])


# Ray's processes cannot import this test module: ship its callbacks by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordReports(UserCallback):
    """Writes rank 0's metrics of every report to a JSON-lines file (runs in the controller)."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({**metrics[0], "checkpoint": checkpoint.path if checkpoint else None}) + "\n")


def read_reports(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- the exchange, in isolation


def _pred(value: int, shape=(2, 4, 4)) -> CompactPrediction:
    return CompactPrediction(np.full(shape, value, np.uint8), np.full(shape, 200, np.uint8))


def board_stats(board, **expected):
    """The board's stats once they show `expected` (publishes are sent from a helper thread,
    fire-and-forget: polled, with a generous limit)."""
    def shown():
        stats = ray.get(board.stats.remote())
        return stats if all(getattr(stats, k) == v for k, v in expected.items()) else None

    return wait_until(shown, 120, f"the exchange board never showed {expected}")


def test_exchange_routes_by_replica_and_drops_after_reads(ray_session):
    """3 students × 2 replicas in one process: replica i reads replica i of its peers only."""
    board = ExchangeBoard.remote(3, 2)
    attempt = ray.get(board.new_attempt.remote())
    ex = {(k, r): RayExchange(board, 3, replica=r, num_replicas=2, attempt=attempt, timeout_s=120)
          for k in range(3) for r in range(2)}
    for (k, r), e in ex.items():
        e.publish(5, k, _pred(10 * k + r))
    for (k, r), e in ex.items():
        got = e.collect(5, k)
        assert [int(p.label[0, 0, 0]) for p in got] == [10 * j + r for j in range(3) if j != k]
        assert got[0].label.flags.writeable
    stats = ray.get(board.stats.remote())
    assert (stats.published, stats.served, stats.held) == (6, 12, 0)

    # A new attempt forgets the old one: what the old attempt publishes is never served.
    ex[(0, 0)].publish(6, 0, _pred(1))
    board_stats(board, published=7)  # landed before the new attempt: then forgotten by it
    attempt2 = ray.get(board.new_attempt.remote())
    ex[(0, 0)].publish(6, 0, _pred(2))  # a worker of the old attempt, late
    board_stats(board, stale_dropped=1)
    new = {k: RayExchange(board, 3, replica=0, num_replicas=2, attempt=attempt2, timeout_s=120) for k in range(3)}
    new[0].publish(6, 0, _pred(3))
    new[1].publish(6, 1, _pred(5))
    assert [int(p.label[0, 0, 0]) for p in new[2].collect(6, 2)] == [3, 5]
    assert ray.get(board.stats.remote()).stale_dropped == 1

    # A peer that never publishes: collect names it after the timeout (student 0's prediction
    # is on the board first, so that only student 1 is missing).
    late = RayExchange(board, 3, replica=0, num_replicas=2, attempt=attempt2, timeout_s=1)
    late.publish(7, 2, _pred(4))
    new[0].publish(7, 0, _pred(4))
    board_stats(board, published=11)
    with pytest.raises(ExchangeTimeout, match=r"student 1 \(worker rank 2, replica 0\)") as timed_out:
        late.collect(7, 2)
    assert "student 0" not in str(timed_out.value)
    for e in [*ex.values(), *new.values(), late]:
        e.close()


# ---------------------------------------------------------------- training on the cluster


@pytest.mark.slow
def test_ray_run_matches_in_process_losses(ray_session, tmp_path):
    """Same seed, same tiny job: K students in one process and K Ray workers give the same
    per-step losses, loss_ss included, so each student got its peers' labels for its batch:
    clicked and unclicked images, CutMixed, through the object store."""
    from seminar.engine import WorkerContext, train_worker

    cfg = tiny_spec(tmp_path / "runs", 3, 3, "data.clicked_images=6", "optim.unlabelled_batch_size=4",
                    "method.cutmix_prob=1")
    local = []
    train_worker(cfg, WorkerContext(students=[0, 1]), InProcessExchange(2), lambda m, d: local.append(m))

    log = tmp_path / "reports.jsonl"
    console = Console(file=io.StringIO(), width=200)
    summary = run_training(cfg, address=ray_session.address, console=console, callbacks=[RecordReports(log)])
    remote = read_reports(log)
    assert [r["step"] for r in remote] == [1, 2, 3]
    # the driver printed the workers' progress, read back from the run's metrics.jsonl
    printed = console.file.getvalue()
    assert re.search(r"^step 3/3 \(100%.*\) .*s1 sup \d", printed, re.M), printed
    assert re.search(r"^step 3: val mIoU: served 0\.\d+", printed, re.M), printed
    for mine, theirs in zip(local, remote):
        for key in ("s0/loss", "s1/loss", "s0/loss_ss", "s1/loss_ss", "s0/loss_sup", "s1/loss_ts"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-3, abs=1e-4), (mine["step"], key)
    assert summary.step == 3
    assert set(summary.miou) >= {"s0/student", "s0/teacher", "s1/student", "s1/teacher", "served"}
    assert Path(summary.checkpoint, "student_1", "teacher.pt").is_file()
    # rank 0 kept the run's history beside its checkpoints, every worker's metrics in it
    history = read_history(str(tmp_path / "runs" / summary.run_name))
    assert [h["step"] for h in history] == [1, 2, 3] and history[-1]["s1/loss"] == remote[-1]["s1/loss"]


class MetricsScraper(threading.Thread):
    """Polls Ray's Prometheus endpoint while a run trains; keeps every seminar_ line seen."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.lines, self.stopped = url, set(), threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
                self.lines.update(line for line in text.splitlines() if line.startswith("ray_seminar_"))
            except OSError:
                pass
            self.stopped.wait(1.0)

    def has(self, name: str, **labels) -> bool:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return any(line.startswith(name + "{") and all(w in line for w in want) for line in self.lines)


@contextlib.contextmanager
def s3_stalled_at_each_checkpoint(s3_server, run: str) -> Iterator[list[str]]:
    """moto stopped (SIGSTOP) for 5 s as soon as each checkpoint of `run` (an s3:// run path)
    has its first file landed; yields the checkpoints that met a stall. The stalls follow the uploads (moto's
    request log), not the clock: every checkpoint meets one, however fast or slow the run."""
    import signal

    done, checkpoint_put = threading.Event(), threading.Event()
    seen: set[str] = set()
    stalls: list[str] = []

    def on_request(line: str) -> None:  # moto's log of a request it answered
        match = re.search(rf'"PUT /{run.removeprefix("s3://")}/(checkpoint_[^/ ]+)/', line)
        if match and match[1] not in seen:
            seen.add(match[1])
            checkpoint_put.set()

    def stall_at_each_checkpoint():
        while not done.is_set():
            if checkpoint_put.wait(0.2):
                checkpoint_put.clear()
                os.kill(s3_server.process.pid, signal.SIGSTOP)
                stalls.append(sorted(seen)[-1])
                done.wait(5)
                os.kill(s3_server.process.pid, signal.SIGCONT)

    s3_server.on_request.append(on_request)
    staller = threading.Thread(target=stall_at_each_checkpoint, daemon=True)
    staller.start()
    try:
        yield stalls
    finally:
        done.set()
        staller.join()
        os.kill(s3_server.process.pid, signal.SIGCONT)
        s3_server.on_request.remove(on_request)


@pytest.mark.slow
def test_s3_checkpoints_survive_a_stall_resume_and_load(ray_session, s3_server, s3_bucket, tmp_path, monkeypatch):
    """Checkpoints go to S3 (every worker's part merged into one directory), also when S3
    stops answering during one: with an S3 request timeout of 3 s, the rest of that
    checkpoint's uploads time out and are retried (pyarrow's S3 retry strategy, the storage
    filesystem Ray Train is given). The same run name resumes from them; Segmenter loads them."""
    from seminar.predict import Segmenter

    monkeypatch.setenv(storage.S3_TIMEOUT_ENV, "3")  # the driver's filesystem, pickled to Ray's controller
    runs = f"s3://{s3_bucket}/runs"
    with s3_stalled_at_each_checkpoint(s3_server, f"{runs}/on-s3") as stalls:
        first = run_training(tiny_spec(runs, 2, 2, "storage.run_name=on-s3"), address=ray_session.address)
    assert first.checkpoint.startswith(f"s3://{s3_bucket}/runs/on-s3/checkpoint_") and first.step == 2
    assert stalls == [first.checkpoint.rsplit("/", 1)[1]]  # the run did meet a stalled S3, and finished
    assert checkpoint.read_meta(first.checkpoint)["step"] == 2

    # Started again under the same name with one more step: it resumes at step 2.
    log = tmp_path / "reports.jsonl"
    second = run_training(tiny_spec(runs, 3, 3, "storage.run_name=on-s3"), address=ray_session.address,
                          callbacks=[RecordReports(log)])
    reports = read_reports(log)
    assert [r["step"] for r in reports] == [3]
    assert reports[0]["run/resumed_from_step"] == 2 and second.step == 3

    # Started again once finished: nothing to train, the same final checkpoint.
    third = run_training(tiny_spec(runs, 3, 3, "storage.run_name=on-s3"), address=ray_session.address)
    assert (third.step, third.checkpoint) == (3, second.checkpoint)

    # the history on S3 (rewritten per report), each step once although the run resumed
    assert [h["step"] for h in read_history(f"{runs}/on-s3")] == [1, 2, 3]
    assert checkpoint.resolve(f"{runs}/on-s3") == second.checkpoint  # a run names its latest checkpoint

    segmenter = Segmenter.load(second.checkpoint)
    labels, confidence = segmenter.segment(np.zeros((32, 32, 3), np.uint8))
    assert labels.shape == confidence.shape == (32, 32)
    assert segmenter.meta["step"] == 3
    # Serving fetched the served teacher's weights only: no optimizer state, no other student.
    # (Rank 0 chose it among both students' teachers, once it had gathered their metrics.)
    served = segmenter.meta["served"]
    assert served in ("teacher_0", "teacher_1") and segmenter.which == served
    teachers = {k: segmenter.meta["metrics"][f"s{k}/val_miou_teacher"] for k in (0, 1)}
    assert segmenter.meta["metrics"]["val/miou"] == max(teachers.values())
    cached = checkpoint.local_copy(second.checkpoint, [])
    assert sorted(str(p.relative_to(cached)) for p in cached.rglob("*") if p.is_file()) == [
        "meta.json", f"student_{served.removeprefix('teacher_')}/teacher.pt"]


def test_a_resuming_worker_fetches_only_its_students_files(s3_bucket, tmp_path):
    """From S3, the worker of student 1 downloads meta.json and student_1/, not every
    student's weights and optimizer state; a local checkpoint is read in place."""
    local = write_initial_checkpoint(str(tmp_path / "checkpoint"), tiny_spec(tmp_path))
    uri = f"s3://{s3_bucket}/runs/r/checkpoint_000000"
    storage.upload_dir(local, uri)
    fs, path = storage.filesystem(uri)
    with checkpoint_parts(Checkpoint(path, filesystem=fs), [1]) as directory:
        assert sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file()) == [
            "meta.json", "student_1/optimizer.pt", "student_1/state.json", "student_1/student.pt",
            "student_1/teacher.pt"]
        assert checkpoint.read_student(directory, 1)["step"] == 0
    assert not Path(directory).exists()
    with checkpoint_parts(Checkpoint(local), [1]) as directory:
        assert Path(directory) == Path(local)


def exported(scraper: MetricsScraper, k: int) -> bool:
    return (scraper.has("ray_seminar_train_loss", student=k, term="ss")
            and scraper.has("ray_seminar_train_exchange_wait_seconds_bucket", student=k)
            and scraper.has("ray_seminar_train_step_cpu_seconds_bucket", student=k))


def train_fn_whose_rank_dies(config: dict, *, rank: int, step: int, marker: str) -> None:
    """`train_fn_per_worker`, except that world rank `rank` kills its process when it reports
    step >= `step`, once (the `marker` file records that it happened, so the restarted worker
    carries on)."""
    from cluster import trainer

    report = trainer.Reporter.__call__

    def report_or_die(self, metrics, checkpoint_dir):
        if self.rank == rank and metrics.get("step", 0) >= step and not Path(marker).exists():
            Path(marker).write_text(f"rank {rank} exited at step {metrics['step']}\n")
            os._exit(1)
        report(self, metrics, checkpoint_dir)

    trainer.Reporter.__call__ = report_or_die  # in this worker's process only
    trainer.train_fn_per_worker(config)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    """Rank 1 dies at step 3: the group restarts from the step-2 checkpoint and finishes
    all 5 steps; Ray's metrics endpoint shows every student's metrics meanwhile."""
    cfg = tiny_spec(tmp_path / "runs", 5, 2)
    log, marker = tmp_path / "reports.jsonl", tmp_path / "fault-happened"
    scraper = MetricsScraper(ray_session.metrics_url)
    scraper.start()
    try:
        summary = run_training(cfg, address=ray_session.address, callbacks=[RecordReports(log)],
                               train_fn=functools.partial(train_fn_whose_rank_dies, rank=1, step=3, marker=str(marker)))
        # the metrics agent exports every few seconds: polled, with a generous limit
        wait_until(lambda: all(exported(scraper, k) for k in range(2)), 300,
                   "every student's metrics on Ray's Prometheus endpoint", interval=1)
    finally:
        scraper.stopped.set()
    assert marker.exists()
    reports = read_reports(log)
    steps = [r["step"] for r in reports]
    assert steps[-1] == 5 and summary.step == 5
    assert steps[:2] == [1, 2] and steps[2:] == [3, 4, 5]  # nothing of the dead attempt's step 3
    assert reports[-1]["run/attempt"] == reports[0]["run/attempt"] + 1
    assert reports[-1]["run/resumed_from_step"] == 2
    for k in range(2):  # rank 0 forwards every student's metrics
        assert {f"s{k}/loss", f"s{k}/exchange_wait", f"s{k}/images_per_s", f"s{k}/val_miou_teacher"} <= set(summary.metrics)
        assert exported(scraper, k)
    assert summary.exchange.held == 0  # every prediction read by its peer and dropped


@pytest.mark.slow
def test_two_replicas_per_student(ray_session, tmp_path):
    """K=2 students x R=2 replicas: 4 workers, gradients all-reduced within each student's
    pair; replica i of each student exchanges with replica i of the other."""
    log = tmp_path / "reports.jsonl"
    summary = run_training(tiny_spec(tmp_path / "runs", 2, 2, "resources.replicas_per_student=2", "optim.batch_size=4"),
                           address=ray_session.address, callbacks=[RecordReports(log)])
    assert [r["step"] for r in read_reports(log)] == [1, 2] and summary.step == 2
    # 4 workers x 2 steps published, each read by its one peer; nothing left behind.
    assert (summary.exchange.published, summary.exchange.served, summary.exchange.held) == (8, 8, 0)
    assert len(summary.exchange.node_of_rank) == 4
    assert {p.name for p in Path(summary.checkpoint).iterdir()} >= {"meta.json", "student_0", "student_1"}


@pytest.mark.slow
def test_local_mode_runs_all_students_in_this_process(ray_session, tmp_path):
    """ScalingConfig(num_workers=0): Ray Train's local mode runs the same train function
    here, hosting every student (a fast way to test it; Ray persists nothing then)."""
    result = build_trainer(tiny_spec(tmp_path / "runs", 2, 2), "local-mode", num_workers=0).fit()
    assert result.metrics["step"] == 2
    assert {"s0/loss_ss", "s1/loss_ss", "s0/val_miou_teacher", "s1/val_miou_teacher"} <= set(result.metrics)


# ---------------------------------------------------------------- fast, clear errors


def _must_not_run(what: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} was called: the error should have come before it")

    return called


def test_unreachable_address_fails_fast(tmp_path, monkeypatch):
    """Refused before connecting (ray.init retries an unreachable address for minutes). How long
    it takes is bench/fail_fast.py's figure."""
    import cluster.trainer

    monkeypatch.setattr(cluster.trainer, "connect", _must_not_run("connecting to the cluster"))
    with pytest.raises(ClusterUnreachable, match="127.0.0.1:9"):
        run_training(tiny_spec(tmp_path), address="127.0.0.1:9")


def test_unwritable_storage_fails_fast(ray_session, s3_bucket, tmp_path, monkeypatch):
    """Refused before a trainer is built (no worker started, nothing trained)."""
    import cluster.trainer

    monkeypatch.setattr(cluster.trainer, "build_trainer", _must_not_run("build_trainer"))
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "a-file" / "runs", "s3://no-such-bucket-here/runs"):
        with pytest.raises(StorageNotWritable, match="not writable"):
            run_training(tiny_spec(path), address=ray_session.address)


def test_too_many_resources_fails_fast(ray_session, tmp_path, monkeypatch):
    """Refused before a trainer is built (which would wait for ever for its placement group)."""
    import cluster.trainer

    monkeypatch.setattr(cluster.trainer, "build_trainer", _must_not_run("build_trainer"))
    with pytest.raises(InsufficientResources, match="can host only"):
        run_training(tiny_spec(tmp_path, 4, 2, "resources.cpus_per_worker=64"), address=ray_session.address)
    with pytest.raises(InsufficientResources, match=r"needs 16 workers \(2 students x 8 replicas\)"):
        run_training(tiny_spec(tmp_path, 4, 2, "resources.replicas_per_student=8", "optim.batch_size=8"),
                     address=ray_session.address)


# ---------------------------------------------------------------- two nodes (it adds a node and removes it)


def _ray_processes() -> dict[int, str]:
    """pid -> command line of this machine's Ray node processes (raylets, log monitors)."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "/raylet/raylet " in cmd or "log_monitor.py" in cmd:
                found[int(d.name)] = cmd
    return found


def _remove_node(node_id: str, started: dict[int, str], timeout: float = 300) -> None:
    """Stop the node this test added: its raylet (which takes its workers and agents with
    it) and its log monitor, by pid; never the head's processes."""
    import signal

    for pid, cmd in started.items():
        if f"--node_id={node_id}" in cmd or "log_monitor.py" in cmd:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        time.sleep(0.5)


@pytest.mark.slow
def test_students_on_two_nodes_train_from_s3(ray_session, s3_bucket, tmp_path):
    """A second node joins with a cache folder of its own (as another machine's disk);
    STRICT_SPREAD puts the two students on different nodes, so their predictions cross nodes
    through the object store; both read the dataset from S3, each through its node's cache;
    the run finishes."""
    from test_remote_data import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data")
    storage.upload_dir(root, f"s3://{s3_bucket}/data")
    data = ["data.dataset=folder", "data.classes=[background,object]", f"data.root=s3://{s3_bucket}/data",
            f"data.clicks=s3://{s3_bucket}/data/clicks.parquet", "data.load_scale=0.25"]
    head_cache, node_b_cache = Path(os.environ[storage.CACHE_ENV]) / "data", tmp_path / "node_b_cache"
    head_before = set(head_cache.iterdir()) if head_cache.is_dir() else set()
    before = _ray_processes()
    ray_session.add_node(num_cpus=2, resources='{"node_b": 2}', env={storage.CACHE_ENV: str(node_b_cache)})
    added = {pid: cmd for pid, cmd in _ray_processes().items() if pid not in before}
    node_b = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_b" in n["Resources"])
    try:
        summary = run_training(tiny_spec(tmp_path / "runs", 3, 3, *data), address=ray_session.address,
                               placement_strategy="STRICT_SPREAD")
        assert summary.step == 3
        nodes = summary.exchange.node_of_rank
        assert len(set(nodes.values())) == 2 and node_b in nodes.values()
        assert (summary.exchange.published, summary.exchange.served, summary.exchange.held) == (6, 6, 0)
        images = {p.stem for p in (root / "images").iterdir()}
        for cache in (node_b_cache / "data", head_cache):  # each node fetched images into its own cache
            fetched = [p for p in cache.iterdir() if p.suffix == ".jpg" and p not in head_before]
            assert fetched and len(fetched) <= len(images), (cache, fetched)
    finally:
        _remove_node(node_b, added)
    assert not any(n["NodeID"] == node_b and n["Alive"] for n in ray.nodes())
