"""Loss terms of source-free adaptation, written as their equations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5
# the IM diversity term pulls the batch's mean prediction towards uniform (SHOT) or towards the source
# model's own initial mean prediction on the target (for skewed marginals: pixels, actions)
DIVERSITY_PRIORS = ("uniform", "initial")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) per row: -sum_k p_k log p_k."""
    return -(probs * torch.log(probs + EPS)).sum(dim=1)


def information_maximization(logits: torch.Tensor, prior: torch.Tensor | None = None,
                             diversity_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SHOT's IM loss  L = mean_i H(p_i) - H(p_bar), p_bar = mean_i p_i: confident per sample, diverse over
    the batch. With a class `prior` pi the diversity term is KL(p_bar || pi) instead of -H(p_bar) (equal up
    to a constant when pi is uniform); it is scaled by `diversity_weight`.

    Returns (loss, mean per-sample entropy, entropy of the mean prediction)."""
    probs = F.softmax(logits, dim=1)
    conditional = entropy(probs).mean()
    p_bar = probs.mean(0)
    marginal = entropy(p_bar[None])[0]
    if prior is None:
        diversity = -marginal
    else:
        diversity = (p_bar * (p_bar.clamp_min(1e-12).log() - prior.clamp_min(1e-12).log())).sum()
    return conditional + diversity_weight * diversity, conditional, marginal


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by a random multiple of 90 degrees, with the multiple as the label."""
    turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
    rotated = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, turns)])
    return rotated, turns
