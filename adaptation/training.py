"""Pieces shared by source training and adaptation: the SHOT optimiser and schedule,
batched prediction over a data set, and accuracy figures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

LR_GAMMA, LR_POWER = 10.0, 0.75


def lr_param_groups(groups: list[tuple[nn.Module, float]], lr: float) -> list[dict]:
    """SGD parameter groups of (module, lr multiplier) pairs at lr * multiplier; frozen parameters are skipped."""
    params = [{"params": [p for p in m.parameters() if p.requires_grad], "lr_mult": mult} for m, mult in groups]
    params = [g for g in params if g["params"]]
    for g in params:
        g["lr"] = lr * g["lr_mult"]
    return params


def set_group_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Every group at lr times its multiplier; returns lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]
    return lr


def shot_optimizer(groups: list[tuple[nn.Module, float]], lr: float, weight_decay: float = 1e-3) -> torch.optim.SGD:
    """SGD (momentum 0.9, Nesterov) over (module, lr multiplier) groups; frozen parameters are skipped."""
    return torch.optim.SGD(lr_param_groups(groups, lr), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def set_shot_lr(optimizer: torch.optim.Optimizer, lr0: float, progress: float) -> float:
    """lr = lr0 * (1 + 10 p)^-0.75 with p in [0, 1] the training progress; returns the base lr."""
    return set_group_lr(optimizer, lr0 * (1 + LR_GAMMA * progress) ** (-LR_POWER))


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0) -> DataLoader:
    """Training loaders shuffle and keep the last, smaller batch as the official code does; only a last
    batch of one sample is dropped (batch norm cannot train on it; the official loop skips it)."""
    drop_last = train and len(dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=workers, persistent_workers=workers > 0)


@torch.no_grad()
def predict(model, loader: DataLoader, runtime) -> dict[str, torch.Tensor]:
    """Bottleneck features, softmax outputs, labels and indices of a whole data set (eval mode)."""
    was_training = model.training
    model.eval()
    feats, probs, labels, indices = [], [], [], []
    for images, y, idx in loader:
        f = model.embed(runtime.images(images))
        feats.append(f.float().cpu())
        probs.append(model.classifier(f).float().softmax(1).cpu())
        labels.append(y)
        indices.append(idx)
    model.train(was_training)
    order = torch.cat(indices).argsort()
    return {"features": torch.cat(feats)[order], "probs": torch.cat(probs)[order],
            "labels": torch.cat(labels)[order]}


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) * 100


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for k in range(num_classes):
        mask = labels == k
        out.append(float((pred[mask] == k).float().mean()) * 100 if mask.any() else None)
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes).numpy()
