"""The Ray cluster layer: seminar learning with one student per Ray Train worker.

Tiny synthetic jobs (32×32 images, batch 2, a handful of steps) on the session's Ray
cluster (`tests/conftest.py`); the multi-node test adds a node and runs last.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.train import UserCallback

from cluster import (ClusterUnreachable, FaultInjection, InsufficientResources, StorageNotWritable, build_trainer,
                     run_training)
from cluster.exchange import ExchangeBoard, ExchangeTimeout, RayExchange
from seminar.config import load_spec
from seminar.exchange import CompactPrediction, InProcessExchange

TINY = [
    "data.synthetic.image_size=32", "data.crop_size=[32,32]", "data.synthetic.num_train=16",
    "data.synthetic.num_val=4", "optim.batch_size=2", "schedule.log_every=1", "resources.loader_workers=0",
    # Pseudo-labels on every pixel from step 0, so that loss_ss depends on what peers sent.
    "method.ss_start=0", "method.rampup_steps=0", "method.tau=0",
]


def tiny_spec(storage_path, steps=4, checkpoint_every=2, *extra):
    return load_spec(None, [*TINY, f"optim.steps={steps}", f"schedule.eval_every={steps}",
                            f"schedule.checkpoint_every={checkpoint_every}", f"storage.path={storage_path}", *extra])


class RecordReports(UserCallback):
    """Writes rank 0's metrics of every report to a JSON-lines file (runs in the controller)."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({**metrics[0], "checkpoint": checkpoint.path if checkpoint else None}) + "\n")


def read_reports(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def board_stats(trainer):
    return ray.get(trainer.train_loop_config["board"].stats.remote())


# ---------------------------------------------------------------- the exchange, in isolation


def _pred(value: int, shape=(2, 4, 4)) -> CompactPrediction:
    return CompactPrediction(np.full(shape, value, np.uint8), np.full(shape, 200, np.uint8))


def test_exchange_routes_by_replica_and_drops_after_reads(ray_session):
    """3 students × 2 replicas in one process: replica i reads replica i of its peers only."""
    board = ExchangeBoard.remote(3, 2)
    attempt = ray.get(board.new_attempt.remote())
    ex = {(k, r): RayExchange(board, 3, replica=r, num_replicas=2, attempt=attempt, timeout_s=10)
          for k in range(3) for r in range(2)}
    for (k, r), e in ex.items():
        e.publish(5, k, _pred(10 * k + r))
    for (k, r), e in ex.items():
        got = e.collect(5, k)
        assert [int(p.label[0, 0, 0]) for p in got] == [10 * j + r for j in range(3) if j != k]
        assert got[0].label.flags.writeable
    stats = ray.get(board.stats.remote())
    assert (stats.published, stats.served, stats.held) == (6, 12, 0)

    # A new attempt forgets the old one: an old publish is ignored, the new one is read.
    ex[(0, 0)].publish(6, 0, _pred(1))
    attempt2 = ray.get(board.new_attempt.remote())
    ex[(0, 0)].publish(6, 0, _pred(2))  # still attempt 1: stale
    fresh = RayExchange(board, 3, replica=0, num_replicas=2, attempt=attempt2, timeout_s=10)
    fresh.publish(6, 0, _pred(3))
    reader = RayExchange(board, 3, replica=0, num_replicas=2, attempt=attempt2, timeout_s=1)
    reader.publish(6, 2, _pred(4))
    with pytest.raises(ExchangeTimeout, match=r"student 1 \(worker rank 2, replica 0\)"):
        reader.collect(6, 2)  # student 1 never published step 6 in this attempt
    assert ray.get(board.stats.remote()).stale_dropped == 1


# ---------------------------------------------------------------- training on the cluster


@pytest.mark.slow
def test_ray_run_matches_in_process_losses(ray_session, tmp_path):
    """Same seed, same tiny job: K students in one process and K Ray workers give the same
    per-step losses, loss_ss included, so each student got its peers' labels for its batch."""
    from seminar.engine import WorkerContext, train_worker

    cfg = tiny_spec(tmp_path / "runs", steps=3, checkpoint_every=3)
    local = []
    train_worker(cfg, WorkerContext(students=[0, 1]), InProcessExchange(2), lambda m, d: local.append(m))

    log = tmp_path / "reports.jsonl"
    summary = run_training(cfg, address=ray_session.address, callbacks=[RecordReports(log)])
    remote = read_reports(log)
    assert [r["step"] for r in remote] == [1, 2, 3]
    for mine, theirs in zip(local, remote):
        for key in ("s0/loss", "s1/loss", "s0/loss_ss", "s1/loss_ss", "s0/loss_sup", "s1/loss_ts"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-3, abs=1e-4), (mine["step"], key)
    assert summary.step == 3
    assert set(summary.miou) >= {"s0/student", "s0/teacher", "s1/student", "s1/teacher", "served"}
    assert Path(summary.checkpoint, "student_1", "teacher.pt").is_file()
