"""Exporting the served network to ONNX: as it is (BatchNorm, ReLU6) against `export.exportable`
(BatchNorm folded into the convolutions, ReLU6 as a clamp), the time to export and the
exported graph's time on ONNX Runtime.

    .venv/bin/python bench/export.py        # ~3 min on 2 cores

The network is the serving benchmark's (DeepLabV3+ EfficientNet-Lite0, decoder 256, untrained
BatchNorm statistics replaced by random ones so that folding changes the weights). Exports
alternate between the two arms (3 each); the graphs then run interleaved on a 512x384 input
with 2 threads (15 rounds). Prints medians (min-max), CPU seconds beside wall, the ratios
and the largest difference between the two graphs' probabilities.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the arms take turns: idle threads sleep

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seminar import export  # noqa: E402
from seminar.models import build_model  # noqa: E402

EXPORTS = 3
ROUNDS = 15


def spread(values: list[float], scale: float = 1.0) -> str:
    return (f"{scale * statistics.median(values):.3g} ({scale * min(values):.3g}-{scale * max(values):.3g})")


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    network = build_model("deeplabv3plus_efficientnet_lite0", 11, 16, None, 256).eval()
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    arms = {"as is": lambda n: export.Probabilities(n).eval(), "exportable": export.exportable}
    wall = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    graphs = {}
    real_exportable = export.exportable
    try:
        for _ in range(EXPORTS):
            for name, prepare in arms.items():
                export.exportable = prepare  # what export_onnx traces
                start, start_cpu = time.perf_counter(), time.process_time()
                graphs[name] = export.export_onnx(network, {})
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    finally:
        export.exportable = real_exportable
    for name in arms:
        print(f"export {name:>10}: {spread(wall[name])} s wall, {spread(cpu[name])} CPU-s")
    ratios = [b / a for a, b in zip(wall["as is"], wall["exportable"])]
    print(f"export time exportable / as is: {spread(ratios)}")

    sessions = {name: export.OnnxNetwork(graph, 2) for name, graph in graphs.items()}
    x = torch.randn(1, 3, 384, 512)
    outputs = {name: session(x) for name, session in sessions.items()}
    print(f"largest probability difference between the graphs: "
          f"{(outputs['as is'] - outputs['exportable']).abs().max().item():.2e}")
    times = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            start = time.perf_counter()
            session(x)
            times[name].append(time.perf_counter() - start)
    for name in sessions:
        print(f"run {name:>10}: {spread(times[name], 1000)} ms")
    ratios = [b / a for a, b in zip(times["as is"], times["exportable"])]
    print(f"graph time exportable / as is: {spread(ratios)} ({ROUNDS} rounds)")


if __name__ == "__main__":
    main()
