"""PGD adversarial examples (Madry et al. 2018), for adversarial training and robust accuracy.

    x_0     = x + U(-eps, eps)                                      (random start)
    x_{t+1} = Proj_{B_inf(x, eps) ∩ [0, 1]} ( x_t + a * sign(grad_x CE(f(x_t), y)) )

The budget is in pixel units ([0, 1] images: eps 8/255, step a = 2/255, 10 steps for training,
20 for evaluation, CIFS's published setting). The models here take normalised images
(x - mean) / std, so the attack works on the normalised tensor with the budget, the step and the
[0, 1] box divided by each channel's std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD

EPS = 8 / 255
STEP_SIZE = 2 / 255
TRAIN_STEPS = 10
EVAL_STEPS = 20
NORMALISATION = {"digits": (DIGITS_MEAN, DIGITS_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@dataclass(frozen=True)
class PGD:
    eps: float = EPS
    step_size: float = STEP_SIZE
    steps: int = TRAIN_STEPS
    random_start: bool = True

    def __post_init__(self):
        if self.eps < 0 or self.step_size <= 0 or self.steps < 1:
            raise ValueError(f"PGD needs eps >= 0, a positive step and at least one step; got eps {self.eps}, "
                             f"step {self.step_size}, steps {self.steps}")


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def pgd_attack(logits_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
               attack: PGD, style: str = "digits") -> torch.Tensor:
    """Adversarial versions of normalised `images` (N, C, H, W) that raise the cross-entropy of
    `logits_of` within the L-inf ball of radius attack.eps (pixel units) and the valid pixel range."""
    mean, std = (_per_channel(v, images) for v in NORMALISATION[style])
    scale = 1.0 / std                           # one pixel unit in normalised units, per channel
    low, high = (0 - mean) * scale, (1 - mean) * scale
    radius, step = attack.eps * scale, attack.step_size * scale
    clean = images.detach()
    adv = clean.clone()
    if attack.random_start:
        adv = adv + (torch.rand_like(adv) * 2 - 1) * radius
        adv = torch.max(torch.min(adv, high), low)
    for _ in range(attack.steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits_of(adv).float(), labels)
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.max(torch.min(adv, clean + radius), clean - radius)
        adv = torch.max(torch.min(adv, high), low)
    return adv.detach()
