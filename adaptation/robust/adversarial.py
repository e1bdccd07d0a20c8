"""PGD adversarial examples (Madry et al. 2018), for adversarial training and robust accuracy.

    x_0     = x + U(-eps, eps)                                      (random start)
    x_{t+1} = Proj_{B_inf(x, eps) ∩ [0, 1]} ( x_t + a * sign(grad_x CE(f(x_t), y)) )

The budget is in pixel units ([0, 1] images). Training: eps 8/255, step a = 2/255, 10 steps, from
a random start (CIFS's published setting; the command line has no option for the training attack's
steps, and code that builds a PGD(...) sets its step with them). Evaluation (evaluation_attack): from
the clean image, PGD-20 with a = eps/10 as the CIFS code (CIFAR10_Res18_CIFS_test.py: nb_iter 20, 30
or 100, eps_iter 0.1 * eps). With fewer than 20 steps a = max(eps/10, 2.5 eps/steps), Madry et al.'s
rule, so that the steps travel 2.5 eps and can reach the ball's edge (eps/10 could not with fewer
than 10 steps; before issue 34 the step was eps/10 whatever the steps). The models here take
normalised images (x - mean) / std, so the attack works on the normalised tensor with the budget,
the step and the [0, 1] box divided by each channel's std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..common import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD

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


def pgd_attack(logits_of: Callable[[torch.Tensor], torch.Tensor] | None, images: torch.Tensor,
               labels: torch.Tensor, attack: PGD, style: str = "digits",
               loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Adversarial versions of normalised `images` (N, C, H, W) that raise the cross-entropy of
    `logits_of` (or `loss_of(images, labels)` when given) within the L-inf ball of radius attack.eps
    (pixel units) and the valid pixel range."""
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
            loss = loss_of(adv, labels) if loss_of is not None else F.cross_entropy(logits_of(adv).float(), labels)
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.max(torch.min(adv, clean + radius), clean - radius)
        adv = torch.max(torch.min(adv, high), low)
    return adv.detach()


EVAL_STEP_FRACTION = 0.1   # evaluation step = eps / 10, from the clean image (the CIFS code's PGD-20)
MADRY_STEP_FACTOR = 2.5    # fewer steps: a = 2.5 eps / steps (Madry et al. 2018)


def evaluation_step(eps: float, steps: int) -> float:
    """The evaluation attack's step: eps/10 at EVAL_STEPS or more (the CIFS code's PGD-20/-30/-100),
    max(eps/10, 2.5 eps/steps) below (module docstring)."""
    if eps <= 0:
        return STEP_SIZE  # nothing can move; PGD wants a positive step
    if steps >= EVAL_STEPS:
        return EVAL_STEP_FRACTION * eps
    return max(EVAL_STEP_FRACTION, MADRY_STEP_FACTOR / steps) * eps


def evaluation_attack(eps: float = EPS, steps: int = EVAL_STEPS) -> PGD:
    return PGD(eps=eps, step_size=evaluation_step(eps, steps), steps=steps, random_start=False)


def robust_accuracy(model: torch.nn.Module, loader, attack: PGD, style: str, device: torch.device,
                    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Clean and PGD accuracy (%) of a classifier (eval mode) over a loader of (images, labels, index).
    `loss_of` replaces the cross-entropy the attack ascends (CIFS models: their joint loss)."""
    was_training = model.training
    model.eval()
    clean = robust = total = 0
    try:
        for images, labels, _ in loader:
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                clean += int((model(images).argmax(1) == labels).sum())
            adv = pgd_attack(model, images, labels, attack, style, loss_of=loss_of)
            with torch.no_grad():
                robust += int((model(adv).argmax(1) == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return {"clean_accuracy": 100.0 * clean / max(total, 1), "robust_accuracy": 100.0 * robust / max(total, 1),
            "attack": {"name": "pgd", "eps": attack.eps, "step_size": attack.step_size, "steps": attack.steps,
                       "random_start": attack.random_start}, "samples": total}
