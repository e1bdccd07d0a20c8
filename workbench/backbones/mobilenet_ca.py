"""MobileNetV2 with coordinate attention (Hou, Zhou, Feng; CVPR 2021).

torchvision's MobileNetV2-1.0 with a CoordAttention(hidden, hidden) inserted in every inverted
residual block between the depthwise convolution and the linear projection, as in the paper's
model (3.95M parameters with the ImageNet-1k classifier). Features: global-average-pooled
1280-d vector (`forward`), or for dense heads the maps at strides 4, 8, 16 and 32
(`forward_features`, described by `feature_info`): the output of the last inverted residual block
at each stride (24, 32, 96 and 320 channels at width 1.0), as timm's `features_only` takes them;
the final 1x1 expansion to 1280 channels belongs to the pooled classification feature only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
from torchvision.models.mobilenetv2 import InvertedResidual

from ..layers import CoordAttention
from . import register_backbone


def _add_coord_attention(block: InvertedResidual) -> None:
    layers = list(block.conv)
    depthwise = layers[-3]  # [..., depthwise conv-BN-ReLU6, projection conv, BN]
    hidden = depthwise[0].out_channels
    block.conv = nn.Sequential(*layers[:-2], CoordAttention(hidden), *layers[-2:])


class MobileNetV2CA(nn.Module):
    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        for module in net.features:
            if isinstance(module, InvertedResidual):
                _add_coord_attention(module)
        self.features = net.features
        self.out_dim = net.last_channel
        # the last inverted residual before each stride-2 block (and the very last one): strides 4..32
        self.feature_taps, self.feature_info = [], []
        stride = 1
        blocks = list(self.features)
        for i, block in enumerate(blocks[:-1]):  # blocks[-1] is the 1x1 expansion to 1280
            stride *= block.stride if isinstance(block, InvertedResidual) else block[0].stride[0]
            next_stride = blocks[i + 1].stride if isinstance(blocks[i + 1], InvertedResidual) else 1
            if stride >= 4 and (next_stride == 2 or i == len(blocks) - 2):
                self.feature_taps.append(i)
                self.feature_info.append({"channels": block.out_channels, "reduction": stride})

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps at strides 4, 8, 16 and 32 listed in `feature_info`."""
        maps = []
        for i, block in enumerate(self.features[:self.feature_taps[-1] + 1]):
            x = block(x)
            if i in self.feature_taps:
                maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


@register_backbone("mobilenetv2_ca")
def mobilenetv2_ca(**kwargs) -> MobileNetV2CA:
    return MobileNetV2CA(**kwargs)
