"""Pieces shared by source training and adaptation: the SHOT optimiser and schedule,
data loaders, batched prediction over a data set, and accuracy figures.

Under torchrun (a `Distributed` with world_size > 1) the same pieces split the work over the ranks:

- a training loader reads this rank's share of a DistributedSampler, seeded alike on every rank so
  that the shares are disjoint; each rank batches `batch_size` samples, so one optimiser step sees
  batch_size * world_size (the effective batch);
- `take_step` averages the gradients over the ranks before the step, so that ranks that start equal
  stay equal (the step one process would take on the union of their batches);
- an evaluation loader reads a contiguous slice of the data set, and `predict` gathers every rank's
  outputs back into data set order: each rank then holds the whole data set's features and softmax,
  as one process would have computed them;
- batch norm: SyncBatchNorm on GPUs. PyTorch's SyncBatchNorm runs on GPUs only, so on CPUs (gloo)
  each rank normalises by its own batch and the running statistics are averaged over the ranks
  before every evaluation (`average_batch_norm_statistics`), which keeps the models equal.

In a world of one every helper leaves the single-process computation exactly as it was.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from workbench.distributed import SINGLE, Distributed

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


def take_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, dist: Distributed = SINGLE) -> None:
    """Backpropagate `loss` and step, with the gradients averaged over the ranks in between."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()


def add_terms(sums: dict[str, float], terms: dict[str, torch.Tensor]) -> None:
    """Accumulate a step's loss terms into per-epoch sums (for the epoch means written to TensorBoard)."""
    for name, value in terms.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach())


class ContiguousShard(Sampler):
    """Rank r's contiguous slice of a data set of n samples (slice sizes differ by at most one, and
    nothing is repeated as DistributedSampler's padding would): every sample is predicted once."""

    def __init__(self, n: int, dist: Distributed):
        self.start, self.stop = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, dist: Distributed = SINGLE,
                seed: int = 0, full_batches: bool = False) -> DataLoader:
    """Training loaders shuffle and keep the last, smaller batch as the official code does; only a last
    batch of one sample is dropped (batch norm cannot train on it; the official loop skips it). With
    `full_batches` every smaller last batch is dropped, unless there is less than one batch of data.

    Under torchrun, training loaders shuffle through a DistributedSampler seeded with `seed` (the same on
    every rank; `forever` and `set_epoch` give each pass a new order) and the rules above apply to the
    samples of this rank, so every rank draws as many batches; evaluation loaders read a ContiguousShard."""
    sampler = None
    if dist.enabled:
        sampler = (DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed) if train
                   else ContiguousShard(len(dataset), dist))
    samples = len(sampler) if sampler is not None else len(dataset)
    drop_last = train and (samples >= batch_size if full_batches else samples % batch_size == 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=workers, persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Give a distributed training loader the order of pass `epoch` (all ranks agree on it)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def forever(loader: DataLoader, start_epoch: int = 0):
    """Batches without end, in a new order at every pass (for loops that count iterations, not epochs);
    `start_epoch` is the pass to begin with (a resumed run)."""
    for epoch in itertools.count(start_epoch):
        set_epoch(loader, epoch)
        yield from loader


@torch.no_grad()
def predict(model, loader: DataLoader, runtime) -> dict[str, torch.Tensor]:
    """Bottleneck features, softmax outputs and labels of a whole data set (eval mode), in data set order.

    Under torchrun `loader` reads this rank's shard (make_loader(..., train=False, dist=...)) and every rank
    returns the whole data set's outputs, gathered from all ranks."""
    if runtime.dist.enabled and not isinstance(loader.sampler, ContiguousShard):
        raise ValueError("under torchrun predict() takes a loader over this rank's shard: "
                         "make_loader(..., train=False, dist=runtime.dist)")
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
    return gather_in_dataset_order({"features": torch.cat(feats), "probs": torch.cat(probs),
                                    "labels": torch.cat(labels)}, torch.cat(indices), runtime.dist, runtime.device)


def gather_in_dataset_order(rows: dict[str, torch.Tensor], indices: torch.Tensor, dist: Distributed = SINGLE,
                            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every rank's rows (each tensor's dim 0 runs along `indices`, the data set index of each row),
    concatenated over the ranks and sorted by data set index: on every rank, the arrays one process would
    hold. The collectives run on `device` (NCCL gathers GPU tensors); the result is on the CPU."""
    if dist.enabled:
        indices = dist.gather_cat(indices.to(device)).cpu()
        rows = {name: dist.gather_cat(value.to(device)).cpu() for name, value in rows.items()}
    order = indices.argsort()
    return {name: value[order] for name, value in rows.items()}


def synchronise_batch_norm(model: nn.Module, runtime) -> nn.Module:
    """Batch norm over the union of the ranks' batches on GPUs (SyncBatchNorm, same parameters and buffers).
    PyTorch's SyncBatchNorm runs on GPUs only: on the CPU the model is returned as it is, and
    `average_batch_norm_statistics` keeps the ranks' running statistics equal instead."""
    if runtime.dist.enabled and runtime.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def average_batch_norm_statistics(model: nn.Module, dist: Distributed) -> None:
    """Replace every (non-synchronised) batch norm's running mean and variance by their mean over the
    ranks, so that all ranks evaluate, and save, the same model."""
    if not dist.enabled:
        return
    for module in model.modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
                and module.track_running_stats):
            for stat in (module.running_mean, module.running_var):
                stat.copy_(dist.sum(stat) / dist.world_size)


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
