"""Local-window multi-head self-attention with relative position bias, and the depthwise-conv FFN:
the two halves of an HRFormer block (Yuan et al. 2021).

The map is zero-padded to multiples of the window size and cut into non-overlapping windows;
attention runs inside each window with a learned bias per relative offset and head (a table of
(2 ws - 1)^2 entries, as in Swin). The FFN is 1x1 conv -> 3x3 depthwise conv -> 1x1 conv, each
with BatchNorm (GELU after the first two), so information also flows between windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def relative_position_index(window: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class LocalWindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int = 7):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window = dim, num_heads, window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_bias = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ws = self.window
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        x = F.pad(x, (0, wp - w, 0, hp - h))
        # (N, C, Hp, Wp) -> (N * windows, ws*ws, C)
        windows = x.view(n, c, hp // ws, ws, wp // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(windows).view(-1, ws * ws, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias[self.bias_index].permute(2, 0, 1)  # (heads, ws*ws, ws*ws)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        out = self.proj(out.transpose(1, 2).reshape(-1, ws * ws, c))
        out = out.view(n, hp // ws, wp // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, hp, wp)
        return out[:, :, :h, :w]


class DepthwiseConvFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.GELU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim), nn.BatchNorm2d(hidden_dim), nn.GELU(),
            nn.Conv2d(hidden_dim, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HRFormerBlock(nn.Module):
    """x + Attn(LN(x)), then + FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(dim), LayerNorm2d(dim)
        self.attn = LocalWindowAttention(dim, num_heads, window_size)
        self.ffn = DepthwiseConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
