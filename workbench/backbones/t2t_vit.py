"""Tokens-to-Token ViT (Yuan et al. 2021).

The T2T module re-structurises the image progressively: a soft split (unfold k7 s4) into
overlapping patches, a small token transformer, then two more rounds of (reshape to a map,
unfold k3 s2, token transformer / projection). A deep-narrow ViT runs on the resulting tokens.
The token transformers are the paper's Performer variant: linear attention through positive
random features phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m), with m = emb / 2 fixed random
directions, and a skip connection on the values (their width differs from the input's).

Variants: t2t_vit_7 (embed 256, depth 7, heads 4, MLP 2x; 4.3M parameters with the ImageNet
head), t2t_vit_14 (384, 14, 6, 3x; 21.5M). The random features and the sinusoid position table
are buffers, not parameters. Features: the class token after the final LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import register_backbone

TOKEN_DIM = 64


class PerformerTokenTransformer(nn.Module):
    def __init__(self, dim: int, emb: int, kernel_ratio: float = 0.5):
        super().__init__()
        self.emb = emb
        self.kqv = nn.Linear(dim, 3 * emb)
        self.proj = nn.Linear(emb, emb)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(emb)
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb))
        m = int(emb * kernel_ratio)
        self.register_buffer("features", nn.init.orthogonal_(torch.empty(m, emb)) * math.sqrt(m))

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.features.shape[0]
        return torch.exp(x @ self.features.T - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)            # (B, T, m)
        normaliser = qp @ kp.sum(1).unsqueeze(-1)                             # (B, T, 1)
        context = (qp @ (kp.transpose(1, 2) @ v)) / (normaliser + 1e-8)     # (B, T, emb)
        return v + self.proj(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sinusoid_table(positions: int, dim: int, device=None) -> torch.Tensor:
    pos = torch.arange(positions, device=device, dtype=torch.float32)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    table = torch.zeros(positions, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class T2TViT(nn.Module):
    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, in_channels: int = 3):
        super().__init__()
        self.splits = nn.ModuleList([nn.Unfold(7, stride=4, padding=2), nn.Unfold(3, stride=2, padding=1),
                                     nn.Unfold(3, stride=2, padding=1)])
        self.token_transformers = nn.ModuleList([
            PerformerTokenTransformer(in_channels * 7 * 7, TOKEN_DIM),
            PerformerTokenTransformer(TOKEN_DIM * 3 * 3, TOKEN_DIM)])
        self.project = nn.Linear(TOKEN_DIM * 3 * 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.out_dim = embed_dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The T2T module: (N, C, H, W) -> (N, tokens, embed_dim)."""
        size = x.shape[-2:]
        x = self.splits[0](x).transpose(1, 2)                       # (N, T0, C*49)
        size = [(s + 2 * 2 - 7) // 4 + 1 for s in size]
        for transformer, split in zip(self.token_transformers, self.splits[1:]):
            x = transformer(x)                                      # (N, T, 64)
            x = x.transpose(1, 2).reshape(x.shape[0], TOKEN_DIM, *size)
            x = split(x).transpose(1, 2)
            size = [(s + 2 - 3) // 2 + 1 for s in size]
        return self.project(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + sinusoid_table(x.shape[1], x.shape[2], x.device).to(x.dtype)
        return self.norm(self.blocks(x))[:, 0]


@register_backbone("t2t_vit_7")
def t2t_vit_7(**kwargs) -> T2TViT:
    return T2TViT(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, **kwargs)


@register_backbone("t2t_vit_14")
def t2t_vit_14(**kwargs) -> T2TViT:
    return T2TViT(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, **kwargs)
