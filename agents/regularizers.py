"""The comparison regularisers of the mixreg paper, as functions of a batch.

Observation augmentations act on a training minibatch of (B, H, W, C) images
in pixel units (uint8 or float in [0, 255]) and return float images:

- cutout_color:  one random box per image filled with a random colour (Laskin et al. 2020)
- random_crop:   replicate-pad by `pad` pixels and crop back at a random offset
- random_conv:   a random 3x3 convolution per image, Xavier-normal weights (Lee et al. 2020)

L2 is a weight penalty added to the loss; batch norm is an IMPALA option
(`batch_norm=True` in the backbone).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def cutout_color(obs: torch.Tensor, min_size: int = 8, max_size: int = 24) -> torch.Tensor:
    b, h, w, _ = obs.shape
    dev = obs.device
    size_h = torch.randint(min_size, max_size + 1, (b, 1, 1), device=dev)
    size_w = torch.randint(min_size, max_size + 1, (b, 1, 1), device=dev)
    top = (torch.rand(b, 1, 1, device=dev) * (h - size_h + 1)).long()
    left = (torch.rand(b, 1, 1, device=dev) * (w - size_w + 1)).long()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    colour = torch.randint(0, 256, (b, 1, 1, obs.shape[-1]), device=dev).float()
    return torch.where(inside.unsqueeze(-1), colour, obs.float())


def random_crop(obs: torch.Tensor, pad: int = 12) -> torch.Tensor:
    b, h, w, _ = obs.shape
    dev = obs.device
    padded = F.pad(obs.float().permute(0, 3, 1, 2), (pad, pad, pad, pad), mode="replicate").permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
    rows = (dy + torch.arange(h, device=dev)).unsqueeze(2)  # (B, H, 1)
    cols = (dx + torch.arange(w, device=dev)).unsqueeze(1)  # (B, 1, W)
    return padded[torch.arange(b, device=dev).view(b, 1, 1), rows, cols]


def random_conv(obs: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    b, h, w, c = obs.shape
    weight = torch.empty(b * c, c, kernel_size, kernel_size, device=obs.device)
    nn.init.xavier_normal_(weight)
    x = obs.float().permute(0, 3, 1, 2).reshape(1, b * c, h, w)
    out = F.conv2d(x, weight, padding=kernel_size // 2, groups=b)
    return out.view(b, c, h, w).permute(0, 2, 3, 1).clamp(0, 255)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cutout_color": cutout_color,
    "random_crop": random_crop,
    "random_conv": random_conv,
}


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """Sum of squared weights (biases and norm parameters excluded)."""
    return torch.stack([p.pow(2).sum() for p in module.parameters() if p.dim() > 1]).sum()
