"""Models: shapes at odd sizes, torchvision weight compatibility, and that a model can learn.

The torchvision layouts are fixtures (tests/data/torchvision_*_keys.json) written down from
torchvision's own definition and cross-checked against a public dump; see their ``_provenance``.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seminar.models import MODEL_NAMES, build_model, load_backbone_weights

DATA = Path(__file__).parent / "data"
NUM_CLASSES = 3
ODD_SIZE = (65, 97)  # not multiples of 16 (or of 2)


def torchvision_layout(name: str) -> dict[str, list[int]]:
    return json.loads((DATA / f"torchvision_{name}_keys.json").read_text())["state_dict"]


def torchvision_format_file(layout: dict[str, list[int]], path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in a torchvision state_dict's layout (head included), saved like a real weights file."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        # num_batches_tracked is a 0-d int64 buffer; everything else is float.
        key: torch.randint(1, 1000, (), generator=generator) if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in layout.items()
    }
    torch.save(state, path)
    return state


def test_registry_names() -> None:
    assert MODEL_NAMES == (
        "deeplabv3plus_resnet18",
        "deeplabv3plus_resnet34",
        "deeplabv3plus_resnet50",
        "deeplabv3plus_resnet101",
        "deeplabv3plus_mobilenetv2",
        "deeplabv3plus_efficientnet_lite0",
    )


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="deeplabv3plus_resnet50") as excinfo:
        build_model("deeplabv3plus_vgg16", NUM_CLASSES)
    assert "deeplabv3plus_vgg16" in str(excinfo.value)
    assert all(name in str(excinfo.value) for name in MODEL_NAMES)


def test_output_stride_must_be_8_or_16() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus_resnet18", NUM_CLASSES, output_stride=32)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES, output_stride=4)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_at_input_size(name: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, output_stride)
    height, width = ODD_SIZE

    model.train()
    assert model(torch.randn(2, 3, height, width)).shape == (2, NUM_CLASSES, height, width)
    # Batch 1 in train mode: the ASPP image-pooling branch must not need batch statistics.
    logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, NUM_CLASSES, height, width)
    logits.mean().backward()

    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, NUM_CLASSES, height, width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(
    ("name", "fixture", "head"),
    [("deeplabv3plus_resnet50", "resnet50", "fc."), ("deeplabv3plus_mobilenetv2", "mobilenet_v2", "classifier.")],
)
def test_backbone_has_torchvision_layout(name: str, fixture: str, head: str, output_stride: int) -> None:
    layout = torchvision_layout(fixture)
    backbone = build_model(name, NUM_CLASSES, output_stride).backbone
    ours = {key: list(value.shape) for key, value in backbone.state_dict().items()}
    # The backbone is torchvision's model without its ImageNet head; same keys, shapes and order.
    theirs = {key: shape for key, shape in layout.items() if not key.startswith(head)}
    assert list(ours.items()) == list(theirs.items())


@pytest.mark.parametrize(
    ("name", "fixture"), [("deeplabv3plus_resnet50", "resnet50"), ("deeplabv3plus_mobilenetv2", "mobilenet_v2")]
)
def test_torchvision_weights_file_loads(name: str, fixture: str, tmp_path: Path) -> None:
    path = tmp_path / f"{fixture}-torchvision.pth"
    state = torchvision_format_file(torchvision_layout(fixture), path)

    model = build_model(name, NUM_CLASSES, output_stride=8, pretrained=str(path))

    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(("fc.", "classifier."))}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_file_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    # Files saved before PyTorch 0.4.1, like resnet50-19c8e357.pth, have no num_batches_tracked.
    path = tmp_path / "resnet50-old.pth"
    layout = {k: s for k, s in torchvision_layout("resnet50").items() if not k.endswith("num_batches_tracked")}
    state = torchvision_format_file(layout, path)

    backbone = build_model("deeplabv3plus_resnet50", NUM_CLASSES).backbone
    load_backbone_weights(backbone, path)
    assert torch.equal(backbone.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_mismatched_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "resnet50-0676ba61.pth"
    torchvision_format_file(torchvision_layout("resnet50"), path)
    backbone = build_model("deeplabv3plus_resnet18", NUM_CLASSES).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    with pytest.raises(ValueError) as excinfo:
        load_backbone_weights(backbone, path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "layer1.0.conv3.weight" in message  # a Bottleneck key ResNet-18 does not have
    assert "layer1.0.conv1.weight" in message  # 1x1 in the file, 3x3 in the model
    # All or nothing: the refused file left the backbone untouched.
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_loader_reads_weights_only(tmp_path: Path) -> None:
    # A file that needs arbitrary unpickling (here, a class instance) must not be executed.
    path = tmp_path / "not-weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Path("x")}, path)
    backbone = build_model("deeplabv3plus_resnet18", NUM_CLASSES).backbone
    with pytest.raises(pickle.UnpicklingError):
        load_backbone_weights(backbone, path)


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES).train()
    images = torch.randn(2, 3, 48, 48)
    # A learnable target: the class is set by which third of the image a pixel is in.
    target = (torch.arange(48) * NUM_CLASSES // 48).expand(2, 48, 48).contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert abs(losses[0] - math.log(NUM_CLASSES)) < 0.2, losses  # small logits at the start
    assert losses[-1] < 0.5 * losses[0], losses


def _imagenet_input(path: Path) -> torch.Tensor:
    """The standard ImageNet evaluation crop (short side 256, centre 224), normalised as the
    project normalises every image (seminar.data.transforms.normalize)."""
    from PIL import Image

    from seminar.data.transforms import normalize

    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    import numpy as np

    return normalize(np.asarray(image.crop((left, top, left + 224, top + 224))))[None]


@pytest.mark.parametrize("photo, imagenet_class", [("2007_000033", 404), ("2011_000025", 779)])
def test_efficientnet_lite0_imagenet_weights_classify_real_photos(photo, imagenet_class):
    """The packaged ImageNet weights, loaded strictly into our layers, rank the right class
    first: aeroplanes -> 404 airliner, a bus -> 779 school bus. Wrong padding, a wrong block
    order or a wrong BatchNorm epsilon would not."""
    from seminar.models.efficientnet_lite import EfficientNetLite0

    model = build_model("deeplabv3plus_efficientnet_lite0", NUM_CLASSES, pretrained="imagenet")
    encoder = EfficientNetLite0(output_stride=32)  # classification strides, same weights
    encoder.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        probs = encoder.eval().classify(_imagenet_input(DATA / "voc_tiny" / "JPEGImages" / f"{photo}.jpg")).softmax(1)
    assert probs.argmax().item() == imagenet_class
    assert probs[0, imagenet_class] > 0.3


def test_pretrained_imagenet_is_refused_where_no_weights_ship():
    with pytest.raises(ValueError, match="only packaged for deeplabv3plus_efficientnet_lite0"):
        build_model("deeplabv3plus_resnet18", NUM_CLASSES, pretrained="imagenet")


def test_feature_dropout_perturbs_training_forwards_only() -> None:
    torch.manual_seed(0)
    plain = build_model("deeplabv3plus_resnet18", 3, decoder_channels=16)
    torch.manual_seed(0)
    dropping = build_model("deeplabv3plus_resnet18", 3, decoder_channels=16, feature_dropout=0.5)
    assert plain.state_dict().keys() == dropping.state_dict().keys()  # checkpoints load either way
    x = torch.randn(2, 3, 64, 64)
    dropping.eval()
    plain.eval()
    assert torch.equal(dropping(x), plain(x)) and torch.equal(dropping(x), dropping(x))
    dropping.train()
    torch.manual_seed(1)
    first = dropping(x)
    torch.manual_seed(1)
    assert torch.equal(first, dropping(x))  # keyed by the seed, as training keys it per step
    assert not torch.equal(first, dropping(x))
