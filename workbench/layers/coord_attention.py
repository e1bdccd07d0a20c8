"""Coordinate attention (Hou, Zhou, Feng; CVPR 2021).

Pool along W (-> C x H x 1) and along H (-> C x 1 x W), encode both with one shared 1x1 conv to
mip = max(8, C / reduction) channels + BN + h-swish, split, map each back to C channels with a
1x1 conv + sigmoid:   out = x * a_h * a_w.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CoordAttention(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None, reduction: int = 32, min_mip: int = 8):
        super().__init__()
        out_channels = out_channels or channels
        mip = max(min_mip, channels // reduction)
        self.encode = nn.Sequential(nn.Conv2d(channels, mip, 1), nn.BatchNorm2d(mip), nn.Hardswish())
        self.attend_h = nn.Conv2d(mip, out_channels, 1)
        self.attend_w = nn.Conv2d(mip, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        pooled_h = x.mean(dim=3, keepdim=True)                   # (N, C, H, 1)
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)   # (N, C, W, 1)
        y = self.encode(torch.cat([pooled_h, pooled_w], dim=2))
        y_h, y_w = y.split([h, w], dim=2)
        a_h = torch.sigmoid(self.attend_h(y_h))                  # (N, C, H, 1)
        a_w = torch.sigmoid(self.attend_w(y_w.transpose(2, 3)))  # (N, C, 1, W)
        return x * a_h * a_w
