"""Interlaced sparse self-attention (Huang et al. 2019).

Dense attention over H x W positions costs (HW)^2. ISSA factorises it into two sparse steps with
group sizes (Ph, Pw), after zero-padding H and W to multiples of them (symmetrically: pad // 2
before, the rest after, as the authors' openseg code does) and cropping the padding afterwards:

1. long range:  positions with the same offset inside their Ph x Pw block (spaced Ph / Pw apart)
                attend to each other  -> Ph*Pw groups of (H/Ph)*(W/Pw) positions;
2. short range: positions inside one contiguous Ph x Pw block attend to each other.

After the two steps every position has a path to every other one.

Each step is a `SelfAttention2d`: context_i = sum_j softmax_j(q_i . k_j / sqrt(d_k)) v_j, then an
output 1x1 conv. The ISA head of the paper (openseg) uses two 1x1 conv-BN-ReLU layers for the
query and for the key (`qk_layers=2`), a bias-free 1x1 conv for the value and a 1x1 conv-BN-ReLU
output (`out_norm=True`); the defaults here (one conv-BN-ReLU, plain output conv) are the lighter
non-local form used inside other blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _projection(in_channels: int, channels: int, layers: int) -> nn.Sequential:
    """`layers` x (1x1 conv -> BN -> ReLU), the first from in_channels, then channels -> channels."""
    modules = []
    for i in range(layers):
        modules += [nn.Conv2d(in_channels if i == 0 else channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*modules)


class SelfAttention2d(nn.Module):
    """Dot-product attention over all positions of a map: 1x1 conv queries/keys (BN, ReLU) and values.

    qk_layers: conv-BN-ReLU layers in each of the query and key projections (the ISA paper: 2).
    out_norm:  BN + ReLU after the output 1x1 conv (the ISA paper: yes).
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, out_channels: int | None = None,
                 *, qk_layers: int = 1, out_norm: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.query = _projection(in_channels, key_channels, qk_layers)
        self.key = _projection(in_channels, key_channels, qk_layers)
        # a value bias only adds a constant to every context vector (the weights sum to 1), which the
        # output BN removes: bias-free with out_norm, as the paper's code
        self.value = nn.Conv2d(in_channels, value_channels, 1, bias=not out_norm)
        self.out = (nn.Sequential(nn.Conv2d(value_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                                  nn.ReLU()) if out_norm else nn.Conv2d(value_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)   # (N, HW, Ck)
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)   # (N, HW, Cv)
        context = F.scaled_dot_product_attention(q, k, v)
        return self.out(context.transpose(1, 2).reshape(n, -1, h, w))


class InterlacedSparseAttention(nn.Module):
    """Long-range then short-range `SelfAttention2d` on interlaced / contiguous groups of (Ph, Pw).

    The long-range block maps channels -> out_channels, the short-range one out -> out (as openseg);
    qk_layers / out_norm are passed to both (see `SelfAttention2d`).
    """

    def __init__(self, channels: int, key_channels: int, value_channels: int, group_size: tuple[int, int] = (8, 8),
                 out_channels: int | None = None, *, qk_layers: int = 1, out_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.group_size = tuple(group_size)
        self.long_range = SelfAttention2d(channels, key_channels, value_channels, out_channels,
                                          qk_layers=qk_layers, out_norm=out_norm)
        self.short_range = SelfAttention2d(out_channels, key_channels, value_channels, out_channels,
                                           qk_layers=qk_layers, out_norm=out_norm)

    def padding(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding to multiples of the group size, split symmetrically."""
        ph, pw = self.group_size
        pad_h, pad_w = math.ceil(h / ph) * ph - h, math.ceil(w / pw) * pw - w
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ph, pw = self.group_size
        left, right, top, bottom = self.padding(h, w)
        x = F.pad(x, (left, right, top, bottom))
        qh, qw = x.shape[2] // ph, x.shape[3] // pw
        # long range: the map as (qh, ph, qw, pw); group by the in-block offset (ph, pw)
        x = x.view(n, -1, qh, ph, qw, pw).permute(0, 3, 5, 1, 2, 4).reshape(n * ph * pw, -1, qh, qw)
        x = self.long_range(x)
        c = x.shape[1]
        # short range: group by block (qh, qw), attend inside the ph x pw block
        x = x.view(n, ph, pw, c, qh, qw).permute(0, 4, 5, 3, 1, 2).reshape(n * qh * qw, c, ph, pw)
        x = self.short_range(x)
        x = x.view(n, qh, qw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, qh * ph, qw * pw)
        return x[:, :, top:top + h, left:left + w]
