"""Loss terms of source-free adaptation, written as their equations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) per row: -sum_k p_k log p_k."""
    return -(probs * torch.log(probs + EPS)).sum(dim=1)


def information_maximization(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SHOT's IM loss  L = mean_i H(p_i) - H(mean_i p_i): confident per sample, diverse over the batch.

    Returns (loss, mean per-sample entropy, entropy of the mean prediction)."""
    probs = F.softmax(logits, dim=1)
    conditional = entropy(probs).mean()
    marginal = entropy(probs.mean(0, keepdim=True)).squeeze(0)
    return conditional - marginal, conditional, marginal


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by a random multiple of 90 degrees, with the multiple as the label."""
    turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
    rotated = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, turns)])
    return rotated, turns
