"""IMPALA CNN (Espeholt et al. 2018) as used for Procgen (Cobbe et al. 2020).

Per stage: conv3x3 -> maxpool 3x3/2 -> two residual blocks
(relu, conv3x3, relu, conv3x3, + skip). After the stages: relu, flatten,
linear to 256 (`fc`), relu. Widths: half [8,16,16], 1x [16,32,32], 2x [32,64,64], 4x [64,128,128].
`batch_norm=True` puts BatchNorm after every convolution (the mixreg paper's
batch-norm baseline); `coord_attention=True` (the `impala_*_ca` variants) applies coordinate
attention to each residual branch before the skip addition. Inputs are float images in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import CoordAttention
from . import register_backbone


def _conv3x3(cin: int, cout: int, batch_norm: bool) -> nn.Module:
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if batch_norm else conv


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, batch_norm: bool = False, coord_attention: bool = False):
        super().__init__()
        self.conv0 = _conv3x3(channels, channels, batch_norm)
        self.conv1 = _conv3x3(channels, channels, batch_norm)
        self.attention = CoordAttention(channels) if coord_attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv0(F.relu(x))
        out = self.conv1(F.relu(out))
        return x + self.attention(out)


class ConvSequence(nn.Module):
    """One IMPALA stage; halves the spatial size (rounding up)."""

    def __init__(self, cin: int, cout: int, batch_norm: bool = False, coord_attention: bool = False):
        super().__init__()
        self.conv = _conv3x3(cin, cout, batch_norm)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res0 = ResidualBlock(cout, batch_norm, coord_attention)
        self.res1 = ResidualBlock(cout, batch_norm, coord_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res1(self.res0(self.pool(self.conv(x))))


class ImpalaCNN(nn.Module):
    def __init__(self, widths: Sequence[int] = (16, 32, 32), in_channels: int = 3, image_size: int = 64,
                 out_dim: int = 256, batch_norm: bool = False, coord_attention: bool = False):
        super().__init__()
        stages, cin, size = [], in_channels, image_size
        for width in widths:
            stages.append(ConvSequence(cin, width, batch_norm, coord_attention))
            cin, size = width, (size + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin * size * size, out_dim)
        self.out_dim = out_dim
        self._init_weights()

    def _init_weights(self) -> None:
        """As baselines' build_impala_cnn (baselines/common/models.py), which train-procgen and the mixreg
        code use: tf.layers.conv2d / tf.layers.dense with no initializer given, i.e. TF's default
        Glorot-uniform kernels, U(+-sqrt(6 / (fan_in + fan_out))) with a conv's fans k*k*c_in and k*k*c_out,
        and zero biases. (baselines' orthogonal init belongs to its `fc` helper: the policy and value heads,
        which the agent sets.) The coordinate-attention variants' 1x1 convolutions get the same."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def flat_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the final dense layer `fc`: the last stage's output, relu'd and flattened.
        Lets a head swap `fc` for a layer of its own (Rainbow's noisy one) and call it itself."""
        return torch.flatten(F.relu(self.stages(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.flat_features(x)))


# "half" ((8, 16, 16), not in the papers) is the quick Procgen job's network: its update costs about a third
# of 1x's on a CPU (docs/RESULTS.md, "The quick Procgen job").
WIDTHS = {"half": (8, 16, 16), "1x": (16, 32, 32), "2x": (32, 64, 64), "4x": (64, 128, 128)}


def _register(scale: str) -> None:
    @register_backbone(f"impala_{scale}")
    def build(**kwargs) -> ImpalaCNN:
        return ImpalaCNN(widths=WIDTHS[scale], **kwargs)

    @register_backbone(f"impala_{scale}_ca")
    def build_ca(**kwargs) -> ImpalaCNN:
        return ImpalaCNN(widths=WIDTHS[scale], coord_attention=True, **kwargs)


for _scale in WIDTHS:
    _register(_scale)
