"""HRFormer (Yuan et al., NeurIPS 2021): HRNet's parallel multi-resolution branches built from
local-window transformer blocks.

    stem:    two 3x3 stride-2 convs (1/4 resolution), then two bottlenecks (64 -> 256 channels)
    stages:  2, 3 and 4 parallel branches at 1/4, 1/8, 1/16, 1/32 with widths C, 2C, 4C, 8C; each
             module runs two HRFormer blocks per branch (local-window attention, 7x7 windows with
             relative position bias, then the depthwise-conv FFN) and fuses every branch into every
             other (1x1 conv + upsampling going up, depthwise-separable stride-2 convs going down)
    head:    (ImageNet) a depthwise bottleneck per branch widening to 128/256/512/1024, stride-2
             merges from high to low resolution, a 1x1 conv to 2048, global average pooling

Variants (channels / heads / stage-3 modules): hrformer_t [18,36,72,144] / [1,2,4,8] / 3 (8.0M
parameters with the ImageNet-1k classifier), hrformer_s [32,64,128,256] / [1,2,4,8] / 4 (13.5M),
hrformer_b [78,156,312,624] / [2,4,8,16] / 4 (50.3M). `forward` gives the pooled 2048-d feature;
`forward_features` (or `forward` with `features_only=True`) the four branch maps
(`feature_info` lists their widths and strides), e.g. for a pose head on the 1/4 branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import HRFormerBlock
from . import register_backbone

STEM_CHANNELS = 64
HEAD_CHANNELS = (32, 64, 128, 256)  # x4 expansion in the head's bottlenecks
FEATURE_DIM = 2048


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bias: bool = False,
            relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (depthwise if `depthwise`) -> 1x1 x4, with a projection shortcut when shapes differ."""

    expansion = 4

    def __init__(self, cin: int, planes: int, depthwise: bool = False, conv_bias: bool = False):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            conv_bn(cin, planes, 1, bias=conv_bias, relu=True),
            conv_bn(planes, planes, 3, groups=planes if depthwise else 1, bias=conv_bias, relu=True),
            conv_bn(planes, cout, 1, bias=conv_bias))
        self.shortcut = nn.Identity() if cin == cout else conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def fuse_down(cin: int, cout: int, steps: int) -> nn.Sequential:
    """`steps` depthwise-separable stride-2 convs from branch j to branch i > j."""
    layers = []
    for k in range(steps):
        last = k == steps - 1
        layers += [conv_bn(cin, cin, 3, stride=2, groups=cin), conv_bn(cin, cout if last else cin, 1, relu=not last)]
    return nn.Sequential(*layers)


class HRFormerModule(nn.Module):
    def __init__(self, channels: Sequence[int], heads: Sequence[int], blocks: int = 2, window: int = 7,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[HRFormerBlock(c, h, window, mlp_ratio) for _ in range(blocks)])
            for c, h in zip(channels, heads))
        n = len(channels)
        self.fuse = nn.ModuleList(nn.ModuleList(
            conv_bn(channels[j], channels[i], 1) if j > i else
            nn.Identity() if j == i else fuse_down(channels[j], channels[i], i - j)
            for j in range(n)) for i in range(n)) if n > 1 else None

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse is None:
            return xs
        out = []
        for i, fuse_row in enumerate(self.fuse):
            y = xs[i]
            for j, fuse in enumerate(fuse_row):
                if j > i:
                    y = y + F.interpolate(fuse(xs[j]), size=xs[i].shape[-2:], mode="bilinear", align_corners=True)
                elif j < i:
                    y = y + fuse(xs[j])
            out.append(F.relu(y))
        return out


class HRFormer(nn.Module):
    def __init__(self, channels: Sequence[int], heads: Sequence[int], stage_modules: Sequence[int] = (1, 4, 2),
                 window: int = 7, mlp_ratio: float = 4.0, in_channels: int = 3, features_only: bool = False):
        super().__init__()
        self.features_only = features_only
        self.stem = nn.Sequential(conv_bn(in_channels, STEM_CHANNELS, 3, stride=2, relu=True),
                                  conv_bn(STEM_CHANNELS, STEM_CHANNELS, 3, stride=2, relu=True),
                                  Bottleneck(STEM_CHANNELS, STEM_CHANNELS), Bottleneck(4 * STEM_CHANNELS, STEM_CHANNELS))
        self.transitions, self.stages = nn.ModuleList(), nn.ModuleList()
        previous = [4 * STEM_CHANNELS]
        for n_branches, n_modules in zip((2, 3, 4), stage_modules):
            current = list(channels[:n_branches])
            self.transitions.append(self._transition(previous, current))
            self.stages.append(nn.Sequential(*[HRFormerModule(current, heads[:n_branches], window=window,
                                                              mlp_ratio=mlp_ratio) for _ in range(n_modules)]))
            previous = current
        self.feature_info = [{"channels": c, "reduction": 4 * 2**i} for i, c in enumerate(channels)]
        # ImageNet classification head up to the pooled feature
        self.widen = nn.ModuleList(Bottleneck(c, h, depthwise=True) for c, h in zip(channels, HEAD_CHANNELS))
        widths = [Bottleneck.expansion * h for h in HEAD_CHANNELS]
        self.merge = nn.ModuleList(
            nn.Sequential(conv_bn(a, a, 3, stride=2, groups=a, bias=True), conv_bn(a, b, 1, bias=True, relu=True))
            for a, b in zip(widths[:-1], widths[1:]))
        self.final = conv_bn(widths[-1], FEATURE_DIM, 1, bias=True, relu=True)
        self.out_dim = FEATURE_DIM

    @staticmethod
    def _transition(previous: list[int], current: list[int]) -> nn.ModuleList:
        """Re-use matching branches, re-width the others, and add a new branch by a stride-2 conv."""
        layers = []
        for i, c in enumerate(current):
            if i < len(previous):
                layers.append(nn.Identity() if previous[i] == c else conv_bn(previous[i], c, 3, relu=True))
            else:
                layers.append(conv_bn(previous[-1], c, 3, stride=2, relu=True))
        return nn.ModuleList(layers)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = [self.stem(x)]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [layer(xs[i] if i < len(xs) else xs[-1]) for i, layer in enumerate(transition)]
            xs = stage(xs)
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        maps = self.forward_features(x)
        if self.features_only:
            return maps
        y = self.widen[0](maps[0])
        for widen, merge, feature in zip(self.widen[1:], self.merge, maps[1:]):
            y = widen(feature) + merge(y)
        return torch.flatten(F.adaptive_avg_pool2d(self.final(y), 1), 1)


VARIANTS = {"t": ((18, 36, 72, 144), (1, 2, 4, 8), (1, 3, 2)),
            "s": ((32, 64, 128, 256), (1, 2, 4, 8), (1, 4, 2)),
            "b": ((78, 156, 312, 624), (2, 4, 8, 16), (1, 4, 2))}


def _register(size: str) -> None:
    @register_backbone(f"hrformer_{size}")
    def build(**kwargs) -> HRFormer:
        channels, heads, modules = VARIANTS[size]
        return HRFormer(channels, heads, modules, **kwargs)


for _size in VARIANTS:
    _register(_size)
