"""MobileNetV2 with coordinate attention (Hou, Zhou, Feng; CVPR 2021).

torchvision's MobileNetV2-1.0 with a CoordAttention(hidden, hidden) inserted in every inverted
residual block between the depthwise convolution and the linear projection, as in the paper's
model (3.95M parameters with the ImageNet-1k classifier). Features: global-average-pooled
1280-d vector.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


@register_backbone("mobilenetv2_ca")
def mobilenetv2_ca(**kwargs) -> MobileNetV2CA:
    return MobileNetV2CA(**kwargs)
