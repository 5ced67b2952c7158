"""The served network as an ONNX graph (seminar.export): parity with eager PyTorch on real
photographs, the runtime switch and its fallback, the exported file's metadata round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from jobs.main import app
from seminar import export, storage
from seminar.data.datasets import read_image
from seminar.data.files import local_file
from seminar.models import MODEL_NAMES, build_model
from seminar.predict import Segmenter

DATA = Path(__file__).parent / "data"
PHOTOS = sorted((DATA / "voc_tiny" / "JPEGImages").glob("*.jpg")) + sorted((DATA / "camvid_tiny" / "val").glob("*.png"))
# ONNX Runtime and eager PyTorch sum in different orders: probabilities agree to float32
# rounding (measured: at most 1e-5 on these photographs), labels except at exact ties.
PROB_TOLERANCE = 1e-4
LABEL_AGREEMENT = 0.999


def write_checkpoint(directory: Path, *students: str) -> str:
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    cfg = load_spec(None, ["method.w_ss=0", f"students=[{', '.join(students)}]", "storage.run_name=export-test",
                           "serving.infer_size=320"])
    return write_initial_checkpoint(str(directory), cfg, {"val/miou": 0.5})


@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory):
    """The study's network: DeepLabV3+ over the ImageNet EfficientNet-Lite0 (decoder untrained)."""
    return write_checkpoint(tmp_path_factory.mktemp("export"),
                            "{model: deeplabv3plus_efficientnet_lite0, pretrained: imagenet, decoder_channels: 64}")


def test_onnx_matches_eager_on_real_photographs(pretrained_checkpoint):
    torch.set_num_threads(2)
    eager = Segmenter.load(pretrained_checkpoint, runtime="torch")
    graph = Segmenter.load(pretrained_checkpoint, runtime="onnx")
    assert (eager.runtime, graph.runtime) == ("torch", "onnx")
    agree = total = 0
    for path in PHOTOS:  # 8 VOC photos and a CamVid frame, each at its own size
        x = eager.model_input(read_image(local_file(path))).unsqueeze(0)
        p_eager, p_graph = eager.predict_probs(x), graph.predict_probs(x)
        assert p_graph.shape == p_eager.shape
        assert (p_graph - p_eager).abs().max().item() <= PROB_TOLERANCE, path.name
        agree += (p_graph.argmax(1) == p_eager.argmax(1)).sum().item()
        total += p_eager[:, 0].numel()
    assert agree / total >= LABEL_AGREEMENT
    # a batch of two sizes padded together, as the endpoint batches them
    batch = torch.randn(3, 3, 97, 131)
    assert (graph.predict_probs(batch) - eager.predict_probs(batch)).abs().max().item() <= PROB_TOLERANCE


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_what_is_exported_folds_batchnorm_and_computes_the_same(name):
    """Every registered network traces through torch.fx: its BatchNorms fold into the
    convolutions before them and ReLU6 becomes a clamp, with the same probabilities."""
    network = build_model(name, 5, decoder_channels=32).eval()
    with torch.no_grad():  # statistics that are not the identity, so that folding has something to get right,
        for m in network.modules():  # and a scale below 1: through 100 layers, logits stay small and the
            if isinstance(m, nn.BatchNorm2d):  # softmax unsaturated (it amplified float rounding past 1e-4)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.copy_(m.running_var.sqrt() * torch.empty_like(m.weight).uniform_(0.5, 0.8))
                m.bias.uniform_(-0.5, 0.5)
    module = export.exportable(network)
    assert not [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.Hardtanh))]
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())  # the network itself is untouched
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert (module(x) - export.Probabilities(network)(x)).abs().max().item() <= PROB_TOLERANCE


def test_export_command_writes_a_graph_that_carries_its_model(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", "{model: deeplabv3plus_mobilenetv2, decoder_channels: 32}",
                                  "{model: deeplabv3plus_mobilenetv2, decoder_channels: 32, seed: 1}")
    out = tmp_path / "out" / "model.onnx"
    result = CliRunner().invoke(app, ["models", "export", checkpoint, "--out", str(out), "--which", "teacher_ensemble"])
    assert result.exit_code == 0, result.output
    assert "serve it: seminar serve" in result.output
    graph = Segmenter.load(str(out))
    eager = Segmenter.load(checkpoint, which="teacher_ensemble")
    assert graph.runtime == "onnx" and graph.which == "teacher_ensemble"
    for key in ("version", "classes", "palette", "click_source", "metrics", "step"):
        assert graph.metadata[key] == eager.metadata[key], key
    assert graph.meta["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert (graph.scale, graph.max_long_side) == (eager.scale, eager.max_long_side) == (1.0, 320)
    image = read_image(local_file(PHOTOS[0]))
    (labels_graph, conf_graph), (labels_eager, conf_eager) = graph.segment(image), eager.segment(image)
    assert (labels_graph == labels_eager).mean() >= LABEL_AGREEMENT
    assert np.abs(conf_graph - conf_eager).max() <= PROB_TOLERANCE
    # an exported file holds one network: asking it for another is refused
    with pytest.raises(ValueError, match="holds one network"):
        Segmenter.load(str(out), which="teacher_0")
    for args, message in [(["--out", str(tmp_path / "model.pt")], "must end in .onnx"),
                          (["--out", str(tmp_path / "m.onnx"), "--format", "tflite"], "only onnx"),
                          ([str(out), "--out", str(tmp_path / "again.onnx")], "exported graph already")]:
        command = ["models", "export", *([] if args[0] == str(out) else [checkpoint]), *args]
        refused = CliRunner().invoke(app, command)
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_runtime_switch_caches_the_export_and_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    checkpoint = write_checkpoint(tmp_path / "ckpt", "{model: deeplabv3plus_mobilenetv2, decoder_channels: 32}")
    exports = []
    real_export = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a: exports.append(1) or real_export(*a))
    assert Segmenter.load(checkpoint, runtime="onnx").runtime == "onnx"
    assert Segmenter.load(checkpoint, runtime="onnx").runtime == "onnx"
    assert len(exports) == 1 and len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # the second from the cache
    assert Segmenter.load(checkpoint, runtime="torch").runtime == "torch"
    # the replica's wait policy governs ONNX Runtime's threads too: passive = they do not spin
    spinning = "session.intra_op.allow_spinning"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    options = Segmenter.load(checkpoint, runtime="onnx").network.session.get_session_options()
    assert options.get_session_config_entry(spinning) == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    options = Segmenter.load(checkpoint, runtime="onnx").network.session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        options.get_session_config_entry(spinning)
    with pytest.raises(ValueError, match="runtime must be one of"):
        Segmenter.load(checkpoint, runtime="tensorrt")

    def broken(*args):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(export, "export_onnx", broken)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "empty-cache"))
    with caplog.at_level(logging.WARNING, logger="seminar.predict"):
        fallback = Segmenter.load(checkpoint, runtime="onnx")
    assert fallback.runtime == "torch" and fallback.metadata["runtime"] == "torch"
    assert "serving eager PyTorch, the ONNX export failed: unsupported operator" in caplog.text
    label, _ = fallback.segment(read_image(local_file(PHOTOS[0])))
    assert label.shape == read_image(local_file(PHOTOS[0])).shape[:2]
