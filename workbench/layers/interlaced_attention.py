"""Interlaced sparse self-attention (Huang et al. 2019).

Dense attention over H x W positions costs (HW)^2. ISSA factorises it into two sparse steps with
group sizes (Ph, Pw), after zero-padding H and W to multiples of them:

1. long range:  positions with the same offset inside their Ph x Pw block (spaced Ph / Pw apart)
                attend to each other  -> Ph*Pw groups of (H/Ph)*(W/Pw) positions;
2. short range: positions inside one contiguous Ph x Pw block attend to each other.

After the two steps every position has a path to every other one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention2d(nn.Module):
    """Dot-product attention over all positions of a map: 1x1 conv queries/keys (BN, ReLU) and values."""

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, out_channels: int | None = None):
        super().__init__()
        self.query = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1), nn.BatchNorm2d(key_channels), nn.ReLU())
        self.key = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1), nn.BatchNorm2d(key_channels), nn.ReLU())
        self.value = nn.Conv2d(in_channels, value_channels, 1)
        self.out = nn.Conv2d(value_channels, out_channels or in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)   # (N, HW, Ck)
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)   # (N, HW, Cv)
        context = F.scaled_dot_product_attention(q, k, v)
        return self.out(context.transpose(1, 2).reshape(n, -1, h, w))


class InterlacedSparseAttention(nn.Module):
    def __init__(self, channels: int, key_channels: int, value_channels: int, group_size: tuple[int, int] = (8, 8)):
        super().__init__()
        self.group_size = group_size
        self.long_range = SelfAttention2d(channels, key_channels, value_channels, channels)
        self.short_range = SelfAttention2d(channels, key_channels, value_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.group_size
        qh, qw = math.ceil(h / ph), math.ceil(w / pw)
        x = F.pad(x, (0, qw * pw - w, 0, qh * ph - h))
        # long range: the map as (qh, ph, qw, pw); group by the in-block offset (ph, pw)
        x = x.view(n, c, qh, ph, qw, pw).permute(0, 3, 5, 1, 2, 4).reshape(n * ph * pw, c, qh, qw)
        x = self.long_range(x)
        # short range: group by block (qh, qw), attend inside the ph x pw block
        x = x.view(n, ph, pw, c, qh, qw).permute(0, 4, 5, 3, 1, 2).reshape(n * qh * qw, c, ph, pw)
        x = self.short_range(x)
        x = x.view(n, qh, qw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, qh * ph, qw * pw)
        return x[:, :, :h, :w]
