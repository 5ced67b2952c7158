"""Summarise the CamVid study (scripts/camvid_study.sh) from each run's metrics.jsonl.

    .venv/bin/python scripts/study_table.py runs/camvid            # rows: mean, spread, per seed
    .venv/bin/python scripts/study_table.py runs/camvid --curves study-seminar-s0

Rows are run names `study-ROW-sSEED`; the served mIoU is `val/miou` at the last evaluation.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from seminar.runs import read_run

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--curves", help="print one run's per-term and pseudo-label curves")
    parser.add_argument("--rows", nargs="*", help="only these rows, in this order (default: all)")
    args = parser.parse_args()
    if args.curves:
        keys = ["loss_sup", "loss_ts", "loss_ss", "pseudo_frac", "diag_pseudo_acc", "diag_student_acc"]
        print("| step | " + " | ".join(f"s{k}/{n}" for k in (0, 1) for n in keys) + " |")
        print("|---" * (1 + 2 * len(keys)) + "|")
        for m in read_run(str(args.root / args.curves)).history:
            values = [m.get(f"s{k}/{n}") for k in (0, 1) for n in keys]
            print(f"| {m['step']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
        return
    rows: dict[str, dict[int, dict]] = defaultdict(dict)
    for run in sorted(args.root.glob("study-*")):
        match = re.fullmatch(r"study-(.+)-s(\d+)", run.name)
        if match and (m := read_run(str(run)).final_evaluation):
            rows[match[1]][int(match[2])] = m
    print("| row | seeds | served mIoU mean | min-max | per seed | served network | "
          + " | ".join(CLASSES) + " |")
    print("|---" * (6 + len(CLASSES)) + "|")
    main = ("full", "pce", "pce2", "mt", "cps", "seminar")
    for row in args.rows or (*main, *sorted(set(rows) - set(main))):
        if row not in rows:
            continue
        runs = rows[row]
        miou = [m["val/miou"] for m in runs.values()]
        served = []
        for m in runs.values():
            teachers = {k: v for k, v in m.items() if k.endswith("val_miou_teacher") or k == "val_miou_teacher_ensemble"}
            name = next((k for k, v in teachers.items() if v == m["val/miou"]), "?")
            served.append("ensemble" if name == "val_miou_teacher_ensemble" else f"teacher {name[1:].split('/')[0]}")
        iou = [statistics.mean(m[f"val/iou/{c}"] for m in runs.values()) for c in range(len(CLASSES))]
        print(f"| {row} | {len(runs)} | {statistics.mean(miou):.3f} | {min(miou):.3f}-{max(miou):.3f} | "
              + ", ".join(f"s{s}: {m['val/miou']:.3f}" for s, m in sorted(runs.items()))
              + f" | {', '.join(served)} | " + " | ".join(f"{v:.2f}" for v in iou) + " |")


if __name__ == "__main__":
    main()
