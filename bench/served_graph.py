"""The served graph's output size: probabilities at the input size (before session 10) against
the decoder's stride 4 (now), each followed by `restore_size` to the uploaded image's size.

    .venv/bin/python bench/served_graph.py        # ~1 min on 2 cores

Both graphs are exported by `seminar.export` from the same untrained network (the serving
benchmark's: DeepLabV3+ EfficientNet-Lite0, decoder 256) and run on ONNX Runtime with 2
threads, interleaved, on a 512x384 input whose image is 640x480 (bench/serve.py's sizes).
Measured 2026-12-02 (the CamVid study paused): graph 258 -> 185 ms, restore 13 -> 11 ms; ratio
0.73 (0.69-0.77, 15 rounds); an earlier run of the same comparison 0.70 (0.60-1.02).
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
from seminar.predict import restore_size  # noqa: E402

ROUNDS = 15


class InputSize(nn.Module):
    """The network as exported before: its `decode` answers at the input size."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def main() -> None:
    torch.set_num_threads(2)
    network = build_model("deeplabv3plus_efficientnet_lite0", 11, 16, None, 256).eval()
    graphs = {"input size": export.OnnxNetwork(export.export_onnx(InputSize(network), {}), 2),
              "stride 4": export.OnnxNetwork(export.export_onnx(network, {}), 2)}
    x = torch.randn(1, 3, 384, 512)
    forward = {name: [] for name in graphs}
    restore = {name: [] for name in graphs}
    for graph in graphs.values():
        graph(x)
    for _ in range(ROUNDS):
        for name, graph in graphs.items():
            start = time.perf_counter()
            probs = graph(x)
            forward[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            restore_size(probs[0], 480, 640)
            restore[name].append(time.perf_counter() - start)
    for name in graphs:
        print(f"{name:>10}: graph {1000 * statistics.median(forward[name]):.1f} ms, "
              f"restore_size to 640x480 {1000 * statistics.median(restore[name]):.1f} ms")
    total = {name: [f + r for f, r in zip(forward[name], restore[name])] for name in graphs}
    ratios = [a / b for a, b in zip(total["stride 4"], total["input size"])]
    print(f"stride 4 / input size, graph + restore: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {ROUNDS} rounds)")


if __name__ == "__main__":
    main()
