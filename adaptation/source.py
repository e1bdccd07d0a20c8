"""Source training for SHOT (Liang et al. 2020): the model that adaptation starts from.

Cross-entropy with label smoothing 0.1. SGD (momentum 0.9, Nesterov, weight decay 1e-3) with
lr = lr0 (1 + 10 p)^-0.75, the backbone at 0.1x when it starts from pretrained weights.

Model selection as the official code does it: the accuracy on a selection set is checked ten
times over the run (every tenth of the iterations) and the last of the best checks is kept
(`>=`). The selection set is
- for built-in digits, the domain's test split, training on all of its train split (the
  official digits protocol: train on the train set, select on the test set);
- otherwise a held-out 10% of the source data, training on the other 90% (the official
  image protocol), or any data passed as `select_on`.

Under torchrun (`train_source(cfg, dist)`) rank 0's freshly initialised model is broadcast, every rank
trains on its share of the data (per-rank batches of `batch_size`; the effective batch is
batch_size * world_size) with averaged gradients and synchronised batch norm, the selection accuracy is
computed on predictions gathered from every rank (so all ranks select the same step), and rank 0
alone writes the run directory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset

from workbench.checkpoint import save_checkpoint
from workbench.distributed import SINGLE, Distributed
from workbench.logging import default_run_name, run_logger, write_json
from workbench.runtime import Runtime, seed_everything

from .data import default_style, image_transform, load_dataset
from .evaluate import builtin_test_split
from .model import ShotModel, model_config
from .training import (accuracy, average_batch_norm_statistics, forever, main_rank_first, make_loader, predict,
                       set_shot_lr, shot_optimizer, synchronise_batch_norm, take_step)

SOURCE_KIND = "source-model"
CHECKPOINT = "source.pt"


@dataclass
class SourceConfig:
    data: str = "builtin:digits/fonts"
    backbone: str = "dtn"
    num_classes: int | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    holdout: float = 0.1                   # fraction held out for selection when there is no `select_on`
    select_on: str | None = None           # selection data; default: the test split of built-in digits
    selection_checks: int = 10             # how many times over the run the selection accuracy is checked
    pretrained: str | None = None
    backbone_lr_mult: float | None = None  # default: 0.1 with pretrained weights, else 1
    transform: str | None = None           # digits | imagenet; default from the data
    eval_target: str | None = None         # report accuracy on this data at the end
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    run_dir: str = ""
    progress: bool = True


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, int(round(n * fraction)))
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def selection_sets(cfg: SourceConfig, style: str):
    """(training set, selection set, name of the selection data) as the config asks."""
    eval_set = load_dataset(cfg.data, image_transform(style, train=False), cfg.num_classes)
    # digits use the same (deterministic) transform for training: share the prepared data set
    train_set = eval_set if style == "digits" else load_dataset(cfg.data, image_transform(style, train=True),
                                                                cfg.num_classes)
    select_on = cfg.select_on or builtin_test_split(cfg.data)
    if select_on:
        selection = load_dataset(select_on, image_transform(style, train=False), train_set.num_classes)
        return train_set, selection, select_on
    fit_idx, hold_idx = split_holdout(len(train_set), cfg.holdout, cfg.seed)
    return Subset(train_set, fit_idx), Subset(eval_set, hold_idx), f"{cfg.holdout:.0%} of {cfg.data}"


cycle = forever  # batches forever, in a new order at every pass (the official loop counts iterations, not epochs)


def train_source(cfg: SourceConfig, dist: Distributed = SINGLE) -> dict:
    seed_everything(dist.seed(cfg.seed))  # data order and dropout differ per rank; the model is rank 0's
    rt = Runtime.create(cfg.device, "fp32", distributed=dist)
    style = cfg.transform or default_style(cfg.data)
    with main_rank_first(dist):  # rank 0 builds any data cache, the others then read it
        train_set, selection_set, selection_name = selection_sets(cfg, style)
    num_classes = (train_set.dataset if isinstance(train_set, Subset) else train_set).num_classes

    backbone_kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    config = model_config(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs, transform=style)
    model = rt.prepare_module(ShotModel(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs))
    dist.broadcast_module(model)
    model = synchronise_batch_norm(model, rt)
    backbone_mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (0.1 if cfg.pretrained else 1.0)
    optimizer = shot_optimizer([(model.backbone, backbone_mult), (model.bottleneck, 1.0), (model.classifier, 1.0)],
                               cfg.lr, cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, dist=dist, seed=cfg.seed)
    selection_loader = make_loader(selection_set, 256, train=False, workers=cfg.workers, dist=dist)

    run_dir = cfg.run_dir or str(Path("runs") / default_run_name("source", cfg.backbone, f"s{cfg.seed}"))
    run_dir = Path(dist.gather_objects(run_dir)[0])  # rank 0's name (time stamps may differ)
    distributed = {"world_size": dist.world_size, "effective_batch_size": cfg.batch_size * dist.world_size}
    if dist.is_main:
        write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "distributed": distributed})
    total_iters = cfg.epochs * len(loader)
    check_every = max(1, total_iters // cfg.selection_checks)
    logger = run_logger(dist.is_main, run_dir, total=total_iters, desc=f"source {cfg.backbone}", progress=cfg.progress)
    best = {"selection_accuracy": -1.0, "selection_data": selection_name, "iteration": -1}
    batches, start = cycle(loader), time.time()
    try:
        model.train()
        for step in range(1, total_iters + 1):
            images, labels, _ = next(batches)
            lr = set_shot_lr(optimizer, cfg.lr, step / total_iters)
            loss = criterion(model(rt.images(images)), labels.to(rt.device))
            take_step(optimizer, loss, dist)
            if step % 20 == 0:
                logger.scalars("source", {"loss": loss.item(), "lr": lr}, step)
            logger.advance(1)
            if step % check_every == 0 or step == total_iters:
                average_batch_norm_statistics(model, dist)  # CPU ranks: one model to check and save
                out = predict(model, selection_loader, rt)
                selection_acc = accuracy(out["probs"].argmax(1), out["labels"])
                logger.scalars("source", {"selection_accuracy": selection_acc}, step)
                if selection_acc >= best["selection_accuracy"]:  # ties go to the later model, as officially
                    best = {**best, "selection_accuracy": selection_acc, "iteration": step,
                            "epoch": step / len(loader)}
                    if dist.is_main:
                        save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {"model_config": config,
                                                                             "model": model.state_dict(),
                                                                             "source_data": cfg.data, **best})
    finally:
        logger.close()
    metrics = {"source_data": cfg.data, "backbone": cfg.backbone, "num_classes": num_classes, **best,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT),
               "distributed": distributed}
    if dist.is_main:
        if cfg.eval_target:
            from .evaluate import evaluate_model

            metrics["target"] = evaluate_model(run_dir / CHECKPOINT, cfg.eval_target, device=cfg.device)
        write_json(run_dir / "metrics.json", metrics)
    return metrics
