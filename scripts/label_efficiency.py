"""How many clicks a model needs: val mIoU against the number of clicked training images.

For each clicked-images budget, trains the rows below (every run in its own process, all
students in it, no Ray; `--jobs` at once), then prints the table and saves the plot:

  pce2     click training of two students on the clicked images alone (method terms off)
  seminar  seminar learning on every image: the clicked ones and the unclicked rest
  full     full supervision (the masks of every image, one student): the ceiling

    .venv/bin/python scripts/label_efficiency.py                      # CamVid, 11..367 clicked images
    .venv/bin/python scripts/label_efficiency.py --clicked 11 45 --seeds 0 1 2 --jobs 1
    .venv/bin/python scripts/label_efficiency.py --row "seminar_cm0=method.cutmix_prob=0" --rows pce2 seminar_cm0

Runs are `OUT/ROW-cN-sSEED` (full: `OUT/full-sSEED`); a finished run is read back, not
trained again, so a stopped study resumes where it stopped. `--row NAME=k=v|k=v` adds a row
(any spec fields on top of the seminar defaults). Clicks are simulated from the masks
(CamVid has no human ones) with `data.click_seed`: the images of a smaller budget are
among those of a larger one, and every seed trains on the same clicked images.
CPU budget (estimated from a 20-step run at ~2 images/s, 8 clicked + 8 unclicked a step): one
seminar run of jobs/configs/camvid.yaml ~40 min on 2 cores; on one H200 six at once took 5-6 min.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROWS = {
    "pce2": "method.w_ts=0|method.w_ss=0",
    "seminar": "",
    "full": "students=[{model: deeplabv3plus_efficientnet_lite0, pretrained: imagenet, seed: 0, decoder_channels: 128}]"
            "|method.supervision=dense|method.w_ts=0|method.w_ss=0",
}
ALL = "all"  # the full row trains on every image's mask whatever the budget


def run_name(row: str, clicked: int, seed: int) -> str:
    return f"full-s{seed}" if row == "full" else f"{row}-c{clicked}-s{seed}"


def run_flags(row_flags: str, row: str, clicked: int, seed: int, total: int, out: Path, extra: list[str]) -> list[str]:
    flags = [f"storage.path={out}", f"storage.run_name={run_name(row, clicked, seed)}", f"optim.seed={seed}",
             f"students.0.seed={2 * seed}"]
    if row != "full":
        flags.append(f"students.1.seed={2 * seed + 1}")
        if clicked < total:
            flags.append(f"data.clicked_images={clicked}")
    flags += [f for f in row_flags.split("|") if f]
    return flags + extra


def final_metrics(run: Path) -> dict | None:
    """The metrics of a run's last evaluation, if it reached its last step."""
    from seminar.runs import read_run

    return read_run(str(run)).final_evaluation


def train_one(config: str, flags: list[str]) -> None:
    """One run in this process (the worker side of the study)."""
    from seminar.checks import load_checked_spec
    from seminar.runs import run_in_process

    cfg = load_checked_spec(config, flags)
    result = run_in_process(cfg)
    print(f"mIoU {result.metrics.get('val/miou', float('nan')):.4f} {cfg.storage.run_name}")


def clicks_per_budget(config: str, budgets: list[int], extra: list[str]) -> dict[int, int]:
    """How many clicks the clicked images of each budget hold."""
    from seminar.checks import load_checked_spec
    from seminar.data import build_dataset

    counts = {}
    for n in budgets:
        data = load_checked_spec(config, [*extra, f"data.clicked_images={n}"]).data
        dataset = build_dataset(data, data.train_split)
        counts[n] = sum(len(dataset[int(i)].clicks) for i in dataset.clicked.nonzero()[0])
    return counts


def summarise(results: dict[tuple[str, int, int], float], rows: list[str], budgets: list[int],
              clicks: dict[int, int]) -> str:
    """The markdown table: mean (min-max, seeds) per row and budget; seminar's share of the gap."""
    def cell(row, n):
        values = [v for (r, c, _), v in sorted(results.items()) if r == row and (c == n or row == "full")]
        if not values:
            return None, "-"
        mean = statistics.mean(values)
        spread = f" ({min(values):.3f}-{max(values):.3f}, {len(values)} seeds)" if len(values) > 1 else ""
        return mean, f"{mean:.3f}{spread}"

    lines = ["| clicked images | clicks | " + " | ".join(rows) + " | gap closed by seminar |",
             "|---" * (len(rows) + 3) + "|"]
    for n in budgets:
        means, texts = zip(*(cell(row, n) for row in rows))
        gap = "-"
        by_row = dict(zip(rows, means))
        if all(by_row.get(r) is not None for r in ("pce2", "seminar", "full")) and by_row["full"] != by_row["pce2"]:
            gap = f"{(by_row['seminar'] - by_row['pce2']) / (by_row['full'] - by_row['pce2']):.0%}"
        lines.append(f"| {n} | {clicks.get(n, '?')} | " + " | ".join(texts) + f" | {gap} |")
    return "\n".join(lines)


def plot(results: dict[tuple[str, int, int], float], rows: list[str], budgets: list[int], clicks: dict[int, int],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row == "full":
            values = [v for (r, _, _), v in results.items() if r == "full"]
            if values:
                ax.axhline(statistics.mean(values), color="k", ls="--", label="full supervision (all masks)")
            continue
        xs, means, lows, highs = [], [], [], []
        for n in budgets:
            values = [v for (r, c, _), v in results.items() if r == row and c == n]
            if values:
                xs.append(clicks.get(n, n))
                means.append(statistics.mean(values))
                lows.append(statistics.mean(values) - min(values))
                highs.append(max(values) - statistics.mean(values))
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, label=row)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([clicks.get(n, n) for n in budgets], [f"{clicks.get(n, n)}\n{n} img" for n in budgets])
    ax.set_xlabel("clicks (simulated), on how many clicked training images")
    ax.set_ylabel("val mIoU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/camvid.yaml")
    parser.add_argument("--clicked", type=int, nargs="+", default=[11, 23, 45, 92, 367],
                        help="clicked-images budgets (the training set's size: every image)")
    parser.add_argument("--rows", nargs="+", default=["pce2", "seminar", "full"])
    parser.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                        help="another row: NAME=field=value|field=value (on top of the spec)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds-at", nargs="*", default=[], metavar="N=S,S",
                        help="other seeds for a budget, e.g. 11=0,1,2 45=0,1,2")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec field for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--out", type=Path, default=Path("runs/label_efficiency"))
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the runs there are")
    parser.add_argument("--one", nargs="*", help=argparse.SUPPRESS)  # worker: train one run with these flags
    args = parser.parse_args()
    if args.one is not None:
        return train_one(args.config, args.one)

    rows = dict(ROWS)
    for spec in args.row:
        name, _, flags = spec.partition("=")
        rows[name] = flags
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {sorted(rows)}")
    seeds_at = {int(n): [int(s) for s in seeds.split(",")] for n, seeds in (x.split("=") for x in args.seeds_at)}

    from seminar.checks import load_checked_spec
    from seminar.data import build_dataset

    data = load_checked_spec(args.config, args.extra).data
    total = int(build_dataset(data, data.train_split).clicked.sum())
    budgets = sorted(min(n, total) for n in args.clicked)
    runs = {}
    for n in budgets:
        for seed in seeds_at.get(n, args.seeds):
            for row in args.rows:
                name = run_name(row, n, seed)
                runs.setdefault(name, (row, n, seed))
    args.out.mkdir(parents=True, exist_ok=True)

    def launch(name: str) -> None:
        row, n, seed = runs[name]
        if args.report_only or final_metrics(args.out / name) is not None:
            return
        flags = run_flags(rows[row], row, n, seed, total, args.out, args.extra)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.call([sys.executable, __file__, "--config", args.config, "--one", *flags],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{name}: {'done' if code == 0 else f'failed ({code}), see {args.out}/{name}.log'}", flush=True)

    print(f"{len(runs)} runs, {args.jobs} at once, in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, runs))

    results, finals = {}, {}
    for name, (row, n, seed) in runs.items():
        metrics = final_metrics(args.out / name)
        if metrics is not None:
            results[(row, n if row != "full" else 0, seed)] = metrics["val/miou"]
            finals[name] = metrics
    clicks = clicks_per_budget(args.config, budgets, args.extra)
    table = summarise(results, args.rows, budgets, clicks)
    print(table)
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps({"clicks": clicks, "runs": finals}, indent=1))
    plot(results, args.rows, budgets, clicks, args.out / "label_efficiency.png")
    print(f"plot: {args.out / 'label_efficiency.png'}; every run's final metrics: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
