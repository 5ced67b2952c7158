"""MobileNetV2, the light DeepLabV3+ backbone.

The layout follows torchvision's ``torchvision/models/mobilenetv2.py``: ``features`` is a Sequential
of 19 modules (``features.0.0.weight``, ``features.1.conv.0.0.weight``, ..., ``features.18.1.*``),
each InvertedResidual keeps its layers in a ``.conv`` Sequential, activations are ReLU6. A
torchvision ImageNet file (``mobilenet_v2-b0353104.pth``) therefore loads as it is, once the
loader has dropped ``classifier.*``. For segmentation the strides past the output stride become
dilations, and ``forward`` returns the stride-4 feature (24 channels) and the last one (1280).
"""

from __future__ import annotations

from torch import Tensor, nn

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's table.
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
LAST_CHANNELS = 1280
# features[:LOW_LEVEL_END] ends with the second 24-channel block, at stride 4.
LOW_LEVEL_END = 4


class ConvBNReLU(nn.Sequential):
    """Conv, BatchNorm, ReLU6 as indices 0, 1, 2 (torchvision's ``Conv2dNormActivation``)."""

    def __init__(
        self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided or dilated), linear 1x1 project; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, dilation=dilation),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk (width 1.0) returning ``(stride-4 feature, last feature)``."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        input_channel = 32
        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        current_stride, dilation = 2, 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            # Past the output stride a stage keeps the resolution and dilates instead; as in
            # torchvision's ResNet its first block keeps the previous dilation.
            previous_dilation = dilation
            if current_stride * s > output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                features.append(
                    InvertedResidual(
                        input_channel,
                        c,
                        stride if i == 0 else 1,
                        expand_ratio=t,
                        dilation=previous_dilation if i == 0 else dilation,
                    )
                )
                input_channel = c
        features.append(ConvBNReLU(input_channel, LAST_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*features)
        # What the DeepLab head needs to know about this trunk.
        self.low_level_channels = 24
        self.out_channels = LAST_CHANNELS

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Layer by layer, not through slices of `features`: a slice is a new module that
        # torch.fx cannot name, and the ONNX export fuses through torch.fx.
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i + 1 == LOW_LEVEL_END:
                low_level = x
        return low_level, x


def mobilenet_v2(output_stride: int = 16) -> MobileNetV2:
    return MobileNetV2(output_stride)
