"""The served network as an ONNX graph, and ONNX Runtime running it.

    seminar models export MODEL --out model.onnx      # one file: the graph and everything to use it
    seminar serve model.onnx                          # served without the checkpoint

The graph takes normalised images [B, 3, H, W] (any batch, height and width) and returns class
probabilities [B, C, ceil(H/4), ceil(W/4)] at the decoder's stride (softmax inside, and for an
ensemble the mean of its members'): what is served is upsampled once, to the image's own size
(`seminar.predict.restore_size`), not to the input size inside the graph and again after it.
Its `seminar` metadata entry is the checkpoint's meta.json plus the network it holds
(`served`), so the classes, palette, version and preprocessing (the spec's load_scale,
serving.infer_size, the ImageNet mean and std) travel with it.

Why ONNX Runtime: on 2 CPU cores it runs the EfficientNet-Lite0 DeepLabV3+ at the endpoint's
default size 1.6x faster than eager PyTorch at batch 1 and 1.65x batched (docs/performance.md); eager PyTorch stays as the fallback
(`serving.runtime: torch`). Exporting uses torch's own exporter (torch.export), which keeps
the height and width symbolic: the older TorchScript exporter bakes the trace's image size
into the ASPP pooling and the upsampling, and answers other sizes wrongly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import warnings

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from . import storage
from .data.base import MEAN, STD

METADATA_KEY = "seminar"
# Bumped when the exported graph changes for the same weights: the cache key includes it.
EXPORT_VERSION = 2  # 2: probabilities at the decoder's stride
OPSET = 18


class ExportError(ValueError):
    """A graph that cannot be used: not ONNX, not ours, or no runtime for it."""


class Probabilities(nn.Module):
    """A segmentation network (or Ensemble) that answers class probabilities at its decoder's
    stride 4. Upsampling them to the input size here and then again to the image's own size
    made the graph and that resize 1.4x slower (bench/served_graph.py)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.decode(images).softmax(1)


class Clamp(nn.Module):
    """nn.Hardtanh (ReLU6) as the clamp it is: torch.export decomposes hardtanh slowly."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


def exportable(network: nn.Module) -> nn.Module:
    """`Probabilities(network)` as the exporter traces it fastest, with the same numbers: each
    BatchNorm folded into the convolution before it (torch.fx's conv-bn fusion, which follows
    the data flow) and ReLU6 as a clamp. Exporting the EfficientNet-Lite0 DeepLabV3+ takes 6.6 s
    instead of 15 s on 2 cores; ONNX Runtime fuses the same way, so the served graph runs as
    fast as before (bench/export.py). `network` itself is left as it is."""
    module = Probabilities(copy.deepcopy(network)).eval()
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardtanh):
                setattr(parent, name, Clamp(child.min_val, child.max_val))
    return fuse(module, inplace=True)


def graph_metadata(meta: dict, served: str) -> dict:
    """What the graph carries besides weights: meta.json, the network and its preprocessing."""
    return {**meta, "served": served, "preprocessing": {"mean": list(MEAN), "std": list(STD)}}


def export_onnx(network: nn.Module, metadata: dict) -> bytes:
    """The probabilities of `network` (eval mode) as a serialised ONNX model."""
    batch = torch.export.Dim("batch", max=1024)
    height, width = torch.export.Dim("height", min=32, max=8192), torch.export.Dim("width", min=32, max=8192)
    example = torch.zeros(2, 3, 96, 128)
    # The exporter logs its progress and the torchvision ops it skips: not the user's business.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(exportable(network), (example,), dynamo=True, verbose=False,
                                        input_names=["image"], output_names=["probs"], opset_version=OPSET,
                                        dynamic_shapes=({0: batch, 2: height, 3: width},), external_data=False)
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    return proto.SerializeToString()


def weights_key(network: nn.Module, served: str) -> str:
    """A name for the exported graph of these weights (cache file name)."""
    digest = hashlib.sha256(f"{EXPORT_VERSION}/{torch.__version__}/{served}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_export(network: nn.Module, metadata: dict) -> bytes:
    """export_onnx, kept in the cache so that a replica that restarts does not export again."""
    path = storage.cache_dir("onnx") / f"{weights_key(network, metadata['served'])}.onnx"
    if path.is_file():
        return path.read_bytes()
    data = export_onnx(network, metadata)
    storage.write_bytes(str(path), data)  # all or nothing: concurrent replicas, one rename wins
    return data


def read_metadata(model: bytes, source: str) -> dict:
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ExportError(f"{source}: not an ONNX model ({' '.join(str(e).split()) or type(e).__name__})") from None
    entries = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in entries:
        raise ExportError(f"{source}: an ONNX model without '{METADATA_KEY}' metadata (not exported by seminar)")
    try:
        return json.loads(entries[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ExportError(f"{source}: '{METADATA_KEY}' metadata is not JSON: {e}") from None


class OnnxNetwork:
    """An exported graph in an ONNX Runtime session: normalised images in, probabilities out."""

    def __init__(self, model: bytes, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One session per replica, its threads bounded like torch's (serving.torch_threads):
        # replicas sharing a node then do not oversubscribe its cores.
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        # Idle threads of ONNX Runtime's own pool spin by default; the replica's OMP_WAIT_POLICY
        # (serving.omp_wait_policy) governs them as it does torch's OpenMP threads.
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":  # else ONNX Runtime would quietly run on the CPU
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ExportError(f"ONNX Runtime refused the graph: {' '.join(str(e).split())[:300]}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (probs,) = self.session.run(["probs"], {"image": np.ascontiguousarray(images.cpu().numpy(), np.float32)})
        return torch.from_numpy(probs)
