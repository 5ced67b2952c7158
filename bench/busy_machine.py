"""Training speed on a busy machine: the default `seminar train --in-process` alone, beside one
busy process and beside two (each `python3 -c 'while True: pass'`), as a user runs it (default
settings: the command's passive OpenMP wait, threads fitted to the CPUs the process may use).

Targets (issue 26): beside one busy process >= 0.5x the images/s alone, beside two >= 0.33x (a
fair share of the cores). The conditions are interleaved (alone, one, two, alone, ...) so that
drift hits them alike; each figure is the median over repetitions of the images/s the run
reported over its steps, with min-max, CPU-seconds of the training process beside wall time.
`--wait-policy active` measures what the old default (spinning threads) did.

    .venv/bin/python bench/busy_machine.py                     # 40 steps, 3 repetitions: ~8 min on 2 cores
    .venv/bin/python bench/busy_machine.py --steps 20 --repeats 2 --wait-policy active
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG = [sys.executable, "-c", "while True: pass"]


def train_once(steps: int, hogs: int, wait_policy: str | None) -> dict[str, float]:
    """One in-process training run beside `hogs` busy processes; its images/s, wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    busy = [subprocess.Popen(HOG) for _ in range(hogs)]
    try:
        with tempfile.TemporaryDirectory() as runs:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jobs.main", "train", "--in-process", "--set", f"storage.path={runs}",
                            "--set", f"optim.steps={steps}", "--set", f"schedule.eval_every={steps}",
                            "--set", f"schedule.checkpoint_every={steps}", "--set", "schedule.log_every=5"],
                           cwd=REPO, env=env, check=True, capture_output=True, timeout=3600)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            history = next(Path(runs).glob("*/metrics.jsonl")).read_text().splitlines()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    reports = [json.loads(line) for line in history]
    # images/s of the training steps themselves (reports after the first, which holds start-up)
    rates = [r["s0/images_per_s"] for r in reports[1:] if "s0/images_per_s" in r]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)  # the hogs are not waited-for children yet
    return {"images_per_s": statistics.median(rates), "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait-policy", choices=("passive", "active"), default=None,
                        help="OMP_WAIT_POLICY for the training (default: the command's own, passive)")
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {0: [], 1: [], 2: []}
    for repeat in range(args.repeats):
        for hogs in results:
            results[hogs].append(train_once(args.steps, hogs, args.wait_policy))
            r = results[hogs][-1]
            print(f"repeat {repeat} beside {hogs} busy: {r['images_per_s']:.2f} img/s, wall {r['wall_s']:.1f} s, "
                  f"cpu {r['cpu_s']:.1f} s", flush=True)
    alone = statistics.median(r["images_per_s"] for r in results[0])
    print(f"\n{args.steps} steps, {args.repeats} repetitions, OMP_WAIT_POLICY={args.wait_policy or 'default (passive)'}")
    for hogs, target in ((0, None), (1, 0.5), (2, 1 / 3)):
        rates = [r["images_per_s"] for r in results[hogs]]
        median = statistics.median(rates)
        line = (f"beside {hogs} busy: {median:.2f} img/s (min {min(rates):.2f}, max {max(rates):.2f}), "
                f"wall {statistics.median(r['wall_s'] for r in results[hogs]):.1f} s, "
                f"cpu {statistics.median(r['cpu_s'] for r in results[hogs]):.1f} s")
        if target:
            ratio = median / alone
            line += f"; {ratio:.2f}x alone (target >= {target:.2f}x: {'met' if ratio >= target else 'MISSED'})"
        print(line)


if __name__ == "__main__":
    main()
