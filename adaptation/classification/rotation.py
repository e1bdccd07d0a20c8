"""SHOT++ rotation self-supervision: which of 4 rotations relates x and rot(x)?

A linear head R reads [B(F(x)); B(F(rot x))] and predicts the rotation (0, 90, 180, 270 degrees).

1. Pre-training: F and B frozen (eval mode), R alone trained with SGD and the SHOT schedule
   lr0 (1 + 10 p)^-0.75 for as many epochs as the adaptation; R's rotation accuracy on the target
   is checked every tenth of the iterations (rounded down) and at the end, and the most accurate
   head is kept.
2. Adaptation: R and the rotated branch train with the SHOT loss; the un-rotated features are
   detached, so F and B learn only from the rotated images.

Under torchrun the pre-training averages R's gradients over the ranks and counts the rotation
accuracy over every rank's share of the target, so all ranks keep the same head.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.adapt.information import rotate_batch
from workbench.adapt.training import set_epoch, set_shot_lr, shot_optimizer, take_step

ROTATIONS = 4
CHECKS = 10  # rotation accuracy is measured every 1/CHECKS of pre-training (and at its end)
KEEP_CHOICES = ("best", "last")


class RotationHead(nn.Module):
    """Predicts which of 4 rotations relates x and rot(x) from [B(F(x)); B(F(rot x))]."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim, ROTATIONS)
        nn.init.xavier_normal_(self.fc.weight)  # the official linear heads' init
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat: torch.Tensor, feat_rot: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([feat, feat_rot], dim=1))


def rotation_loss(model, head: RotationHead, images: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted rotation during adaptation. The un-rotated features enter as
    constants (detached): only the rotated branch moves F and B."""
    rotated, turns = rotate_batch(images)
    with torch.no_grad():
        feat = model.embed(images)
    return F.cross_entropy(head(feat, model.embed(rotated)), turns)


@torch.no_grad()
def rotation_accuracy(model, head: RotationHead, loader, runtime) -> float:
    """Accuracy (%) of the head on one pass over `loader`, each image given a random rotation (under
    torchrun: over every rank's pass)."""
    correct = total = 0
    for images, _, _ in loader:
        images = runtime.images(images)
        rotated, turns = rotate_batch(images)
        pred = head(model.embed(images), model.embed(rotated)).argmax(1)
        correct += int((pred == turns).sum())
        total += len(turns)
    if runtime.dist.enabled:
        correct, total = runtime.dist.sum(torch.tensor([correct, total], device=runtime.device)).tolist()
    return 100.0 * correct / max(total, 1)


def pretrain_rotation_head(model, head: RotationHead, loader, runtime, epochs: int, lr: float,
                           weight_decay: float, logger=None, keep: str = "last") -> dict:
    """Step 1 above. Returns the accuracy of every check and of the head kept (`keep`: "last", the final head,
    as the official code ends with, or "best")."""
    if keep not in KEEP_CHOICES:
        raise ValueError(f"unknown rotation head choice {keep!r}: use one of {', '.join(KEEP_CHOICES)}")
    was_training = model.training
    model.eval()  # F and B frozen: their features are computed without gradient below
    optimizer = shot_optimizer([(head, 1.0)], lr, weight_decay)
    total_iters = epochs * len(loader)
    every = max(1, total_iters // CHECKS)
    checks, best_acc, best_state, step = [], -1.0, None, 0
    if logger is not None:
        logger.stage("rotation head", total_iters)
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        loss_sum = 0.0
        for images, _, _ in loader:
            step += 1
            set_shot_lr(optimizer, lr, step / total_iters)
            images = runtime.images(images)
            with torch.no_grad():
                rotated, turns = rotate_batch(images)
                feats, feats_rot = model.embed(images), model.embed(rotated)
            loss = F.cross_entropy(head(feats, feats_rot), turns)
            take_step(optimizer, loss, runtime.dist)
            loss_sum += loss.item()
            if logger is not None:
                logger.advance(1)
            if step % every == 0 or step == total_iters:
                acc = rotation_accuracy(model, head, loader, runtime)
                checks.append(acc)
                if logger is not None:
                    logger.scalars("rotation", {"pretrain_accuracy": acc}, step)
                if acc > best_acc:  # the first of equally accurate heads
                    best_acc, best_state = acc, copy.deepcopy(head.state_dict())
        if logger is not None:
            logger.scalars("rotation", {"pretrain_loss": loss_sum / max(len(loader), 1)}, epoch)
    if keep == "best" and best_state is not None:
        head.load_state_dict(best_state)
    model.train(was_training)
    kept = (best_acc if keep == "best" else checks[-1]) if checks else None
    return {"checks": checks, "kept": keep, "accuracy": kept}
