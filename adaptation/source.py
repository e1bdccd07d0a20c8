"""Source training for SHOT (Liang et al. 2020): the model that adaptation starts from.

Cross-entropy with label smoothing 0.1 on 90% of the source data; the checkpoint with
the best accuracy on the held-out 10% is kept. SGD (momentum 0.9, Nesterov, weight decay
1e-3) with lr = lr0 (1 + 10 p)^-0.75, the backbone at 0.1x when it starts from
pretrained weights.
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
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import Runtime, seed_everything

from .data import default_style, image_transform, load_dataset
from .model import ShotModel, model_config
from .training import accuracy, make_loader, predict, set_shot_lr, shot_optimizer

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
    holdout: float = 0.1
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


def train_source(cfg: SourceConfig) -> dict:
    seed_everything(cfg.seed)
    rt = Runtime.create(cfg.device, "fp32")
    style = cfg.transform or default_style(cfg.data)
    eval_set = load_dataset(cfg.data, image_transform(style, train=False), cfg.num_classes)
    # digits use the same (deterministic) transform for training: share the prepared data set
    train_set = eval_set if style == "digits" else load_dataset(cfg.data, image_transform(style, train=True),
                                                                cfg.num_classes)
    num_classes = train_set.num_classes
    fit_idx, hold_idx = split_holdout(len(train_set), cfg.holdout, cfg.seed)

    backbone_kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    config = model_config(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs, transform=style)
    model = rt.prepare_module(ShotModel(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs))
    backbone_mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (0.1 if cfg.pretrained else 1.0)
    optimizer = shot_optimizer([(model.backbone, backbone_mult), (model.bottleneck, 1.0), (model.classifier, 1.0)],
                               cfg.lr, cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loader = make_loader(Subset(train_set, fit_idx), cfg.batch_size, train=True, workers=cfg.workers)
    hold_loader = make_loader(Subset(eval_set, hold_idx), 256, train=False, workers=cfg.workers)

    run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("source", cfg.backbone, f"s{cfg.seed}"))
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    total_iters = cfg.epochs * len(loader)
    logger = RunLogger(run_dir, total=total_iters, desc=f"source {cfg.backbone}", progress=cfg.progress)
    best = {"holdout_accuracy": -1.0, "epoch": -1}
    step, start = 0, time.time()
    try:
        for epoch in range(cfg.epochs):
            model.train()
            for images, labels, _ in loader:
                lr = set_shot_lr(optimizer, cfg.lr, step / total_iters)
                loss = criterion(model(rt.images(images)), labels.to(rt.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step % 20 == 0:
                    logger.scalars("source", {"loss": loss.item(), "lr": lr}, step)
                logger.advance(1)
            out = predict(model, hold_loader, rt)
            hold_acc = accuracy(out["probs"].argmax(1), out["labels"])
            logger.scalars("source", {"holdout_accuracy": hold_acc}, step)
            if hold_acc > best["holdout_accuracy"]:
                best = {"holdout_accuracy": hold_acc, "epoch": epoch}
                save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {"model_config": config,
                                                                     "model": model.state_dict(),
                                                                     "source_data": cfg.data, **best})
    finally:
        logger.close()
    metrics = {"source_data": cfg.data, "backbone": cfg.backbone, "num_classes": num_classes, **best,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT)}
    if cfg.eval_target:
        from .evaluate import evaluate_model

        metrics["target"] = evaluate_model(run_dir / CHECKPOINT, cfg.eval_target, device=cfg.device)
    write_json(run_dir / "metrics.json", metrics)
    return metrics
