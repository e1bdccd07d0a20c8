"""ORDNet's branches beyond local convolution and plain global attention (Huang et al. 2020).

- Middle range: self-attention restricted to non-overlapping P x P patches (the map is zero-padded
  to multiples of P), for dependencies longer than a convolution's reach but local in the scene.
- Reweighted long range: global attention A = softmax(Q K^T / sqrt(d)) in which every key
  position j is reweighted by how strongly the whole map attends to it, r_j = mean_i A_ij, and the
  rows are renormalised: A'_ij = A_ij r_j / sum_k A_ik r_k. Positions that correlate with many
  others dominate the aggregation; isolated ones fade.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interlaced_attention import SelfAttention2d


class MiddleRangeAttention(nn.Module):
    def __init__(self, channels: int, key_channels: int, value_channels: int, patch_size: int = 8):
        super().__init__()
        self.patch = patch_size
        self.attention = SelfAttention2d(channels, key_channels, value_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch
        qh, qw = math.ceil(h / p), math.ceil(w / p)
        x = F.pad(x, (0, qw * p - w, 0, qh * p - h))
        patches = x.view(n, c, qh, p, qw, p).permute(0, 2, 4, 1, 3, 5).reshape(n * qh * qw, c, p, p)
        out = self.attention(patches)
        out = out.view(n, qh, qw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, qh * p, qw * p)
        return out[:, :, :h, :w]


class ReweightedLongRangeAttention(SelfAttention2d):
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).flatten(2).transpose(1, 2)   # (N, HW, Ck)
        k = self.key(x).flatten(2)                     # (N, Ck, HW)
        attn = torch.softmax(q @ k / math.sqrt(q.shape[-1]), dim=-1)
        importance = attn.mean(dim=1, keepdim=True)    # r_j: attention position j receives, (N, 1, HW)
        reweighted = attn * importance
        return reweighted / reweighted.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        v = self.value(x).flatten(2).transpose(1, 2)   # (N, HW, Cv)
        context = self.attention_weights(x) @ v
        return self.out(context.transpose(1, 2).reshape(n, -1, h, w))
