"""DeepLabV3+ (Chen et al., 2018): ASPP on the last backbone feature, plus a decoder that mixes in
the stride-4 feature for sharper boundaries.

    image -> backbone -> (low-level feature @4, last feature @8 or @16)
    last feature -> ASPP -> upsample to @4 -> concat with 1x1-projected low-level (48 ch)
    -> two 3x3 convs -> 1x1 classifier -> upsample to the input size

Any input size works: the head resizes to the sizes it actually gets rather than assuming the
input is a multiple of 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ASPP atrous rates of the paper at output stride 16; at output stride 8 they are doubled so the
# branches see the same field of view in image pixels.
ASPP_RATES_OS16 = (6, 12, 18)
LOW_LEVEL_PROJECT_CHANNELS = 48


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = (kernel_size - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average, 1x1 conv, broadcast back to the feature size.

    It has no BatchNorm: after global pooling there is a single value per channel and image, and
    BatchNorm in train mode fails on batch 1 (and is noisy on small batches). A biased conv does.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.conv(self.pool(x)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and the image branch, fused by a 1x1."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels)]
            + [conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
            + [ASPPPooling(in_channels, out_channels)]
        )
        self.project = nn.Sequential(
            conv_bn_relu(len(self.branches) * out_channels, out_channels),
            nn.Dropout(0.1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ over a backbone whose forward returns ``(low_level, last)`` and which exposes
    ``low_level_channels`` and ``out_channels``. ``forward(x [B,3,H,W]) -> logits [B,C,H,W]``;
    ``decode(x)`` the same logits before the last upsampling, at the decoder's stride 4."""

    def __init__(self, backbone: nn.Module, num_classes: int, output_stride: int = 16, decoder_channels: int = 256,
                 feature_dropout: float = 0.0) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        rates = tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, decoder_channels, rates)
        self.low_level_project = conv_bn_relu(backbone.low_level_channels, LOW_LEVEL_PROJECT_CHANNELS)
        self.decoder = nn.Sequential(
            conv_bn_relu(decoder_channels + LOW_LEVEL_PROJECT_CHANNELS, decoder_channels, 3),
            conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        # A perturbation for training (UniMatch's feature perturbation): whole channels of the
        # decoder's input dropped; no parameters, and nothing in eval mode (teachers, serving).
        self.feature_dropout = nn.Dropout2d(feature_dropout)

        # The backbone initialised itself (or was loaded); initialise only the head.
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Small logits at the start, so the first loss is about log(num_classes) rather than a
        # spike that the first steps spend undoing.
        nn.init.normal_(self.classifier.weight, std=0.01)

    def decode(self, x: Tensor) -> Tensor:
        low_level, last = self.backbone(x)
        low_level = self.low_level_project(low_level)
        context = F.interpolate(self.aspp(last), size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(self.feature_dropout(torch.cat([context, low_level], dim=1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.decode(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
