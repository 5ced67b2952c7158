"""Benchmark: what the exchange costs, and how K students on K workers scale.

    flock /tmp/seminar-ray.lock .venv/bin/python bench/exchange.py              # embedded local Ray
    .venv/bin/python bench/exchange.py --address 10.0.0.5:6379                  # an existing cluster
    .venv/bin/python bench/exchange.py --steps 40 --image-size 96 --set method.tau=0.5

Measures six configurations, one after the other, and prints them side by side:

  1. K students on K Ray workers, exchange one step ahead (what training does);
  2. the same without the lookahead: each publish is held back until that step is
     collected, so every step waits for a full exchange round trip;
  3. K students on K Ray workers with `method.w_ss=0`: no exchange, but the same number of
     busy workers competing for the machine's cores as in 1;
  4. one student on one Ray worker (no peers, no exchange): the ideal per-student step;
  5. K students in this one process (`InProcessExchange`), with as many torch threads as
     one worker has (`--inproc-threads` to change; more threads than free cores make
     torch's thread pool collapse on a busy machine): the same method work as 1 (the peers'
     pseudo-labels, their fusion and `loss_ss`), nothing distributed - its CPU seconds per
     student-step are the fair denominator of K on K, where 4 skips `loss_ss`;
  6. the machine's own floor, without Ray or the method: K plain processes each timing a
     bare forward/backward/optimizer step of student 0's network on a batch of the same
     size, started together, against one such process alone. What K on K costs beyond this ratio is
     ours; up to it, it is the machine (shared caches, memory bandwidth, a hypervisor's
     cores, Ray's own processes having no core to spare).

Step time is the engine's `s{k}/step_time` (look ahead + collect + train, excluding
reporting), CPU/step its `s{k}/step_cpu_time` (CPU seconds of the worker process in that
step: CPU/step near the step time means the worker computed all along; well below, it waited
for a core), (thread) its `s{k}/step_thread_cpu_time` (the training thread's share: with one
torch thread, the computation itself; the rest is Ray's threads and the loader's): the median
over the steps after `--warmup` of all `--rounds` runs, which are interleaved so that load
from other users of the machine hits every configuration alike.
Exchange wait is the mean `s{k}/exchange_wait`. The 20th percentile (p20) is printed too:
on a shared machine other users' load only ever adds time, so it is the steadier figure.
Targets: wait <= 3% of the step with the lookahead; K on K <= 1.15x one student. The
students are the same architecture with different seeds by default, so that a slower
network does not show up as exchange wait (`--model` picks it).

Measured on the 2-core development machine (session 2, quiet, load average 1-2), defaults,
three runs: exchange wait 0.0-0.1% of the step with the lookahead, 4.9-5.6% without (target
met). K on K / one student 1.57x, 1.30x, 1.33x (p20 1.43x, 1.29x, 1.11x); K on K / K on K
without exchange 1.18x, 0.82x, 1.17x. With `--set resources.loader_workers=0`: 1.49x (p20
1.28x). The machine floor, two bare training processes of the student's network (ResNet-18,
decoder 64) / one, without Ray, standalone: 1.27x, 1.06x, 0.74x in three rounds. On two
cores the two workers, their loaders and Ray's own processes share two cores, and run-to-run
swings (+-0.2x) exceed the effect: the 1.15x target needs a machine with more than K free
cores to be shown.

Session 3, with the CPU column, two runs (load average 0.4 -> 1.9, then 2.9 -> 2.0): wait
share 0.0% with the lookahead both times, 4.7% without; K on K / one student 1.17x (p20
1.09x), then 1.39x (p20 1.27x); CPU seconds per step K on K / one 0.93x, then 1.15x. In the
first run each worker computed 0.271 s of a 0.343 s step (one student alone: 0.291 of
0.292): the excess wall time was waiting for a core. CPU time per step swings +-15% too
(shared caches and the hypervisor count in it), so two cores cannot resolve the 15% the
target allows either way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
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
from seminar.config import StudentConfig, TrainConfig, load_spec  # noqa: E402
from seminar.engine import WorkerContext, train_worker  # noqa: E402
from seminar.exchange import InProcessExchange  # noqa: E402
from seminar.models import build_model  # noqa: E402


class StepLog(UserCallback):
    """Appends rank 0's metrics of every report to a JSON-lines file (on the driver's node,
    where Ray Train places its controller)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def spec(args, num_students: int, storage: str, *extra: str, exchange: bool = True) -> TrainConfig:
    students = [f"students.{k}.model={args.model}" for k in range(2)] + ["students.1.seed=1"]
    cfg = load_spec(None, [
        *students,
        f"data.synthetic.image_size={args.image_size}", f"data.crop_size=[{args.image_size},{args.image_size}]",
        f"data.synthetic.num_train={max(64, 4 * args.batch)}", "data.synthetic.num_val=4",
        *([] if exchange else ["method.w_ss=0"]), f"optim.batch_size={args.batch}", f"optim.steps={args.steps}", "schedule.log_every=1",
        f"schedule.eval_every={args.steps}", f"schedule.checkpoint_every={args.steps}",
        "method.ss_start=0", f"storage.path={storage}", *extra, *args.overrides])
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


def summarize(steps: list[dict], num_students: int, warmup: int, last: int) -> dict[str, float]:
    """Median step time (robust to other users' load spikes) and mean exchange wait over
    the steps after warm-up, leaving out the last step (it has nothing to look ahead to)."""
    kept = [m for m in steps if warmup < m["step"] < last] or steps
    times = [m[f"s{k}/step_time"] for m in kept for k in range(num_students)]
    waits = [m.get(f"s{k}/exchange_wait", 0.0) for m in kept for k in range(num_students)]
    cpu = [m[f"s{k}/step_cpu_time"] for m in kept for k in range(num_students)]
    thread_cpu = [m[f"s{k}/step_thread_cpu_time"] for m in kept for k in range(num_students)]
    return step_figures(times, cpu, waits, thread_cpu)


def step_figures(times: list[float], cpu: list[float], waits: list[float], thread_cpu: list[float]) -> dict[str, float]:
    """One row of the table: median and 20th-percentile step time, mean exchange wait,
    median CPU seconds per step, of the process and of its training thread."""
    return {"step_time": statistics.median(times), "p20": statistics.quantiles(times, n=5)[0],
            "wait": statistics.mean(waits), "cpu": statistics.median(cpu),
            "thread_cpu": statistics.median(thread_cpu)}


def on_ray(cfg: TrainConfig, workdir: Path, name: str) -> list[dict]:
    log = workdir / f"{name}.jsonl"
    trainer = build_trainer(cfg, f"bench-{name}-{os.getpid()}", callbacks=[StepLog(str(log))], keep_checkpoints=1)
    trainer.fit()
    return [json.loads(line) for line in log.read_text().splitlines()]


def in_process(cfg: TrainConfig, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    steps: list[dict] = []
    train_worker(cfg, WorkerContext(students=list(range(cfg.num_students))), InProcessExchange(cfg.num_students),
                 lambda metrics, directory: steps.append(dict(metrics)))
    return steps


def plain_steps(student: StudentConfig, num_classes: int, image_size: int, batch: int, threads: int,
                steps: int, warmup: int, start, times) -> None:
    """A bare training step of the student's network, timed after `warmup` steps (in a
    process of its own)."""
    torch.set_num_threads(threads)
    net = build_model(student.model, num_classes, student.output_stride, None, student.decoder_channels)
    optimizer = torch.optim.AdamW(net.parameters())
    x = torch.randn(batch, 3, image_size, image_size)
    start.wait()
    for step in range(steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = net(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append((time.perf_counter() - t0, time.process_time() - cpu0))


def machine_floor(cfg: TrainConfig, args, num_processes: int, threads: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of the steps of `num_processes` bare training processes of
    student 0's network, started together (no Ray)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start, times = manager.Barrier(num_processes), manager.list()
        procs = [ctx.Process(target=plain_steps, args=(cfg.students[0], cfg.data.synthetic.num_classes, args.image_size,
                                                       args.batch, threads, args.steps, args.warmup, start, times))
                 for _ in range(num_processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return list(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster address; default: an embedded local Ray")
    p.add_argument("--students", type=int, default=2, help="K")
    p.add_argument("--model", default="deeplabv3plus_resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="per student")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the averages")
    p.add_argument("--keep", action="store_true", help="keep the runs' directory (step logs, checkpoints)")
    p.add_argument("--inproc-threads", type=int, default=None, help="torch threads of the in-process run")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    p.add_argument("--json", type=Path, help="also write the figures here (bench/report.py)")
    args = p.parse_args(argv)
    K = args.students

    workdir = Path(tempfile.mkdtemp(prefix="seminar-bench-"))
    runs = str(workdir / "runs")
    configs = {  # name -> (spec, students per run)
        "k_on_k": (spec(args, K, runs), K),
        "k_on_k_sync": (spec(args, K, runs, "resources.exchange_lookahead=false"), K),
        "k_on_k_alone": (spec(args, K, runs, exchange=False), K),
        "one": (spec(args, 1, runs), 1),
    }
    load_before = os.getloadavg()[0]
    t0 = time.time()
    steps: dict[str, list[dict]] = {name: [] for name in configs}
    threads = args.inproc_threads or max(1, int(configs["k_on_k"][0].resources.cpus_per_worker))
    steps["in_process"] = []
    started_here = connect(args.address, configs["k_on_k"][0])
    try:
        for r in range(args.rounds):  # interleaved, so that other users' load hits every configuration
            for name, (cfg, _) in configs.items():
                steps[name] += on_ray(cfg, workdir, f"{name}-{r}")
            steps["in_process"] += in_process(configs["k_on_k"][0], threads)
    finally:
        if started_here:
            ray.shutdown()
    results = {name: summarize(steps[name], n, args.warmup, args.steps) for name, (_, n) in configs.items()}
    # One in-process step trains all K students: per student-step, its CPU seconds / K.
    results["in_process"] = summarize(steps["in_process"], 1, args.warmup, args.steps)
    results["in_process"]["wait"] = 0.0
    floor: dict[str, list[tuple[float, float]]] = {"floor_k": [], "floor_one": []}
    for _ in range(args.rounds):  # interleaved too
        floor["floor_k"] += machine_floor(configs["k_on_k"][0], args, K, threads)
        floor["floor_one"] += machine_floor(configs["k_on_k"][0], args, 1, threads)
    for name, steps_ in floor.items():
        cpu = [cpu for _, cpu in steps_]  # one single-threaded process: its CPU is its thread's
        results[name] = step_figures([wall for wall, _ in steps_], cpu, [0.0], cpu)

    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)  # the runs' checkpoints: hundreds of MB

    pixels = args.batch * args.image_size ** 2
    print(f"\nK={K} students ({args.model}), {args.image_size}x{args.image_size}, batch {args.batch} per student, "
          f"{args.steps} steps x {args.rounds} rounds (median of steps {args.warmup + 1}-{args.steps - 1}); "
          f"payload {2 * pixels / 1024:.0f} KiB per student per step; {os.cpu_count()} cores, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"{time.time() - t0:.0f} s")
    rows = [
        (f"{K} students on {K} workers, lookahead", results["k_on_k"]),
        (f"{K} students on {K} workers, no lookahead", results["k_on_k_sync"]),
        (f"{K} students on {K} workers, no exchange", results["k_on_k_alone"]),
        ("1 student on 1 worker", results["one"]),
        (f"{K} students in 1 process ({threads} threads)", results["in_process"]),
        (f"machine: {K} bare training processes", results["floor_k"]),
        ("machine: 1 bare training process", results["floor_one"]),
    ]
    print(f"{'configuration':<44} {'step time':>10} {'(p20)':>8} {'CPU/step':>9} {'(thread)':>9} {'exchange wait':>14} "
          f"{'wait share':>11}")
    for label, r in rows:
        share = f"{100 * r['wait'] / r['step_time']:.1f}%" if r["wait"] else "-"
        wait = f"{1000 * r['wait']:.1f} ms" if r["wait"] else "-"
        print(f"{label:<44} {r['step_time']:>8.3f} s {r['p20']:>7.3f} {r['cpu']:>7.3f} s {r['thread_cpu']:>7.3f} s "
              f"{wait:>14} {share:>11}")

    def ratio(a: str, b: str) -> str:
        return (f"{results[a]['step_time'] / results[b]['step_time']:.2f}x "
                f"(p20 {results[a]['p20'] / results[b]['p20']:.2f}x)")

    share = results["k_on_k"]["wait"] / results["k_on_k"]["step_time"]
    share_sync = results["k_on_k_sync"]["wait"] / results["k_on_k_sync"]["step_time"]
    print(f"\nexchange wait share: {100 * share:.1f}% with lookahead (target <= 3%), "
          f"{100 * share_sync:.1f}% without")
    print(f"K on K / one student: {ratio('k_on_k', 'one')} (target <= 1.15x); "
          f"CPU seconds per step: {results['k_on_k']['cpu'] / results['one']['cpu']:.2f}x "
          f"(above 1: work the distribution adds; the rest of the wall-time ratio is waiting for a core)")
    print(f"K on K / K on K without exchange: {ratio('k_on_k', 'k_on_k_alone')}")
    print(f"K on K / the same K students in one process, CPU seconds per student-step: "
          f"{K * results['k_on_k']['cpu'] / results['in_process']['cpu']:.2f}x (the same method work, "
          f"loss_ss included: what distributing them adds; 'one student' has no peers and skips loss_ss); "
          f"of the training thread alone {K * results['k_on_k']['thread_cpu'] / results['in_process']['thread_cpu']:.2f}x "
          f"(above 1: the same computation took more CPU beside the workers' other activity; the rest is other threads)")
    print(f"K in one process / one student: {ratio('in_process', 'one')}")
    machine = results["floor_k"]["step_time"] / results["floor_one"]["step_time"]
    print(f"machine floor, K bare processes / one: {ratio('floor_k', 'floor_one')}; "
          f"K on K / one beyond the floor: {results['k_on_k']['step_time'] / results['one']['step_time'] / machine:.2f}x")
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps({"students": K, "model": args.model, "image_size": args.image_size,
                                         "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                                         "cores": os.cpu_count(), "free_cores": os.cpu_count() - load_before,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
