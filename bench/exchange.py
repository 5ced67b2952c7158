"""Benchmark: what the exchange costs, and how K students on K workers scale.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/exchange.py              # embedded local Ray
    .venv/bin/python bench/exchange.py --address 10.0.0.5:6379                  # an existing cluster
    .venv/bin/python bench/exchange.py --steps 40 --image-size 96 --set method.tau=0.5

Runs the same synthetic job four ways, one after the other, and prints them side by side:

  1. K students on K Ray workers, exchange one step ahead (what training does);
  2. the same without the lookahead: each publish is held back until that step is
     collected, so every step waits for a full exchange round trip;
  3. one student on one Ray worker (no peers, no exchange): the ideal per-student step;
  4. K students in this one process (`InProcessExchange`), with K torch threads.

Step time is the engine's `s{k}/step_time` (look ahead + collect + train, excluding
reporting), averaged over the steps after `--warmup`; exchange wait is `s{k}/exchange_wait`.
Targets: wait <= 3% of the step with the lookahead; K on K <= 1.15x one student. The
students are the same architecture with different seeds by default, so that a slower
network does not show up as exchange wait (`--model` picks it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Ray Train's controller collects reports every 2 s by default; tiny steps report faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.train import UserCallback  # noqa: E402

from cluster.trainer import build_trainer, connect  # noqa: E402
from seminar.config import TrainConfig, load_spec  # noqa: E402
from seminar.engine import WorkerContext, train_worker  # noqa: E402
from seminar.exchange import InProcessExchange  # noqa: E402


class StepLog(UserCallback):
    """Appends rank 0's metrics of every report to a JSON-lines file (on the driver's node,
    where Ray Train places its controller)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def spec(args, num_students: int, storage: str) -> TrainConfig:
    students = [f"students.{k}.model={args.model}" for k in range(2)] + ["students.1.seed=1"]
    cfg = load_spec(None, [
        *students,
        f"data.synthetic.image_size={args.image_size}", f"data.crop_size=[{args.image_size},{args.image_size}]",
        f"data.synthetic.num_train={max(64, 4 * args.batch)}", "data.synthetic.num_val=4",
        f"optim.batch_size={args.batch}", f"optim.steps={args.steps}", "schedule.log_every=1",
        f"schedule.eval_every={args.steps}", f"schedule.checkpoint_every={args.steps}",
        "method.ss_start=0", f"storage.path={storage}", *args.overrides])
    if num_students < cfg.num_students:
        data = cfg.model_dump()
        data["students"] = data["students"][:num_students]
        data["method"]["w_ss"] = 0.0  # one student has no peers to exchange with
        cfg = TrainConfig.model_validate(data)
    elif num_students > cfg.num_students:
        data = cfg.model_dump()
        data["students"] += [{**data["students"][-1], "seed": k} for k in range(cfg.num_students, num_students)]
        cfg = TrainConfig.model_validate(data)
    return cfg


def averages(steps: list[dict], num_students: int, warmup: int) -> dict[str, float]:
    kept = [m for m in steps if m["step"] > warmup] or steps
    step_time = statistics.mean(m[f"s{k}/step_time"] for m in kept for k in range(num_students))
    wait = statistics.mean(m.get(f"s{k}/exchange_wait", 0.0) for m in kept for k in range(num_students))
    return {"step_time": step_time, "wait": wait, "steps": len(kept)}


def on_ray(cfg: TrainConfig, workdir: Path, name: str, lookahead: bool = True) -> dict:
    log = workdir / f"{name}.jsonl"
    trainer = build_trainer(cfg, f"bench-{name}-{os.getpid()}", callbacks=[StepLog(str(log))],
                            lookahead=lookahead, keep_checkpoints=1)
    trainer.fit()
    return [json.loads(line) for line in log.read_text().splitlines()]


def in_process(cfg: TrainConfig, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    steps: list[dict] = []
    train_worker(cfg, WorkerContext(students=list(range(cfg.num_students))), InProcessExchange(cfg.num_students),
                 lambda metrics, directory: steps.append(dict(metrics)))
    return steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster address; default: an embedded local Ray")
    p.add_argument("--students", type=int, default=2, help="K")
    p.add_argument("--model", default="deeplabv3plus_resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="per student")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the averages")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    args = p.parse_args(argv)
    K = args.students

    workdir = Path(tempfile.mkdtemp(prefix="seminar-bench-"))
    cfg_k, cfg_1 = spec(args, K, str(workdir / "runs")), spec(args, 1, str(workdir / "runs"))
    started_here = connect(args.address, cfg_k)
    try:
        t0 = time.time()
        results = {
            "k_on_k": averages(on_ray(cfg_k, workdir, "k-on-k"), K, args.warmup),
            "k_on_k_sync": averages(on_ray(cfg_k, workdir, "k-on-k-no-lookahead", lookahead=False), K, args.warmup),
            "one": averages(on_ray(cfg_1, workdir, "one-student"), 1, args.warmup),
        }
    finally:
        if started_here:
            ray.shutdown()
    threads = K * max(1, int(cfg_k.resources.cpus_per_worker))
    steps = in_process(cfg_k, threads)
    results["in_process"] = averages(steps, 1, args.warmup)  # one step trains all K students
    results["in_process"]["wait"] = 0.0

    pixels = args.batch * args.image_size ** 2
    print(f"\nK={K} students ({args.model}), {args.image_size}x{args.image_size}, batch {args.batch} per student, "
          f"{args.steps} steps (averaged after step {args.warmup}); exchange payload {2 * pixels / 1024:.0f} KiB "
          f"per student per step; {os.cpu_count()} cores; {time.time() - t0:.0f} s")
    rows = [
        (f"{K} students on {K} workers, lookahead", results["k_on_k"]),
        (f"{K} students on {K} workers, no lookahead", results["k_on_k_sync"]),
        ("1 student on 1 worker", results["one"]),
        (f"{K} students in 1 process ({threads} threads)", results["in_process"]),
    ]
    print(f"{'configuration':<44} {'step time':>10} {'exchange wait':>14} {'wait share':>11}")
    for label, r in rows:
        share = f"{100 * r['wait'] / r['step_time']:.1f}%" if r["wait"] else "-"
        wait = f"{1000 * r['wait']:.1f} ms" if r["wait"] else "-"
        print(f"{label:<44} {r['step_time']:>8.3f} s {wait:>14} {share:>11}")
    share = results["k_on_k"]["wait"] / results["k_on_k"]["step_time"]
    share_sync = results["k_on_k_sync"]["wait"] / results["k_on_k_sync"]["step_time"]
    ratio = results["k_on_k"]["step_time"] / results["one"]["step_time"]
    print(f"\nexchange wait share: {100 * share:.1f}% with lookahead (target <= 3%), "
          f"{100 * share_sync:.1f}% without")
    print(f"K on K / one student: {ratio:.2f}x (target <= 1.15x); "
          f"K in one process / one student: {results['in_process']['step_time'] / results['one']['step_time']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
