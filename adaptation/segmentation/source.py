"""Source training of a segmentation model: the model that pixel-level SHOT adapts.

The segmentation recipe of openseg / HRNet (REFERENCE 8.1, 8.2):

    L  = CE(logits, y; ignore 255) + aux_weight * CE(aux_logits, y; ignore 255)   (aux_weight 0.4 where
                                                                                   the head has an aux head)
    SGD, momentum 0.9, weight decay 5e-4, lr = lr0 (1 - t/T)^0.9 (poly), lr0 = 0.01

The papers' SGD starts from ImageNet weights. From scratch on the 64 x 64 scenes it leaves every
model at all-background for the first thousand iterations (DTN, ResNet-18; CPU runs of 400-1500
iterations, docs/RESULTS.md), so `optimizer="adam"` (lr0 2e-3, no weight decay, same poly decay)
is offered for from-scratch training and is what scripts/run_scenes_benchmark.py uses.

with the joint random scale (0.5-2.0) / crop / flip of adaptation.segmentation.data. As the classification
source (adaptation.classification.source), the model is selected on held-out data: mIoU on the selection set is
checked `selection_checks` times over the run and the last of the best checks is kept (`>=`). The
selection set is the val split for built-in scenes (training on the train split), otherwise a
held-out 10% of the data (training on the other 90%), or any data passed as `select_on`. The test
split of built-in scenes is never looked at during training: the kept checkpoint is scored on it once
at the end (`metrics["test"]`, the in-domain figure to report), as on `eval_target`.

The checkpoint `source.pt` (kind "source-model") carries "task": "segmentation" and the
`dense_model_config`, so `adapt` and `evaluate` pick the dense pipeline from it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

from workbench.adapt.training import forever, lr_param_groups, make_loader, set_group_lr
from workbench.adapt.selection import Selection
from workbench.checkpoint import save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from ..common import split_holdout
from ..dense.model import SegmentationModel, dense_model_config
from .data import (IGNORE_INDEX, builtin_scenes_test_split, builtin_scenes_val_split, load_segmentation,
                   parse_builtin_scenes)
from .evaluate import TASK, eval_loader, public_scores, segmentation_pass

SOURCE_KIND = "source-model"
CHECKPOINT = "source.pt"
MOMENTUM, WEIGHT_DECAY, POLY_POWER, LR = 0.9, 5e-4, 0.9, 1e-2   # openseg / HRNet Cityscapes configs
ADAM_LR = 2e-3
OPTIMIZERS = ("sgd", "adam")


def poly_lr(lr0: float, progress: float, power: float = POLY_POWER) -> float:
    """lr0 (1 - p)^power, p in [0, 1] the training progress."""
    return lr0 * max(0.0, 1.0 - progress) ** power


def segmentation_optimizer(groups: list[tuple[nn.Module, float]], lr: float, weight_decay: float = WEIGHT_DECAY,
                           momentum: float = MOMENTUM) -> torch.optim.SGD:
    """SGD over (module, lr multiplier) groups; frozen parameters are skipped."""
    return torch.optim.SGD(lr_param_groups(groups, lr), lr=lr, momentum=momentum, weight_decay=weight_decay)


def segmentation_loss(logits: torch.Tensor, aux: torch.Tensor | None, masks: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(main) + aux_weight CE(aux), both ignoring 255, in float32; (total, terms)."""
    terms = {"ce": F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)}
    total = terms["ce"]
    if aux is not None and aux_weight > 0:
        terms["aux_ce"] = F.cross_entropy(aux.float(), masks, ignore_index=IGNORE_INDEX)
        total = total + aux_weight * terms["aux_ce"]
    return total, terms


@dataclass
class DenseSourceConfig(RunSettings):
    data: str = "builtin:scenes/printed"
    backbone: str = "resnet18"
    head: str = "fcn"
    head_channels: int | None = None       # None: the head's published width (512); the scenes need far less
    output_stride: int | None = None       # None: the segmentation default (8 for ResNets)
    num_classes: int | None = None
    crop_size: int | None = None           # None: the scenes' 64 x 64 canvas, 512 for user data
    # Small batch and few epochs so that a run on the 64 x 64 scenes stays within CPU reach: the papers'
    # batch 8-12 at 1024 x 512 crops is ~1000x the pixels of 16 scenes, and 10 epochs of 3000 scenes are
    # ~1900 iterations, of the order of the papers' iteration counts scaled to a 64 x 64 problem.
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "sgd"                 # "adam" for from-scratch models (see the module doc)
    lr: float | None = None                # None: 0.01 (SGD) or 2e-3 (Adam)
    weight_decay: float = WEIGHT_DECAY
    momentum: float = MOMENTUM
    poly_power: float = POLY_POWER
    holdout: float = 0.1                   # fraction held out for selection when there is no `select_on`
    select_on: str | None = None           # default: the val split of built-in scenes
    selection_checks: int = 5              # mIoU checks over the run (each is a full pass of the selection set)
    pretrained: str | None = None
    eval_target: str | None = None         # report mIoU on this data at the end
    precision: str = "fp32"                # fp32 | bf16 | auto (bf16 autocast where the hardware computes it)


def check_disjoint(data: str, select_on: str) -> None:
    """A selection set inside the training data would choose the checkpoint on scenes it was fit on."""
    if data.startswith("builtin:scenes/") and select_on.startswith("builtin:scenes/"):
        (d_domain, d_split), (s_domain, s_split) = parse_builtin_scenes(data), parse_builtin_scenes(select_on)
        if d_domain == s_domain and (d_split == s_split or "all" in (d_split, s_split)):
            raise ValueError(f"--select-on {select_on} overlaps --data {data}: select on "
                             f"builtin:scenes/{s_domain}:val and train on builtin:scenes/{d_domain}:train")
    elif data == select_on:
        raise ValueError(f"--select-on is the training data {data}: pass held-out data, or leave it out to hold "
                         f"out 10% of --data")


def selection_sets(cfg: DenseSourceConfig):
    """(training set, selection set, selection data name): built-in scenes select on their val split."""
    select_on = cfg.select_on or builtin_scenes_val_split(cfg.data)
    if select_on:
        check_disjoint(cfg.data, select_on)
    train_set = load_segmentation(cfg.data, cfg.num_classes, train=True, crop_size=cfg.crop_size)
    if select_on:
        return train_set, load_segmentation(select_on, train_set.num_classes, train=False), select_on
    eval_set = load_segmentation(cfg.data, train_set.num_classes, train=False)
    if len(train_set) < 2:
        raise ValueError(f"{cfg.data} holds {len(train_set)} image: a held-out selection set needs at least 2 "
                         f"(or pass --select-on)")
    fit_idx, hold_idx = split_holdout(len(train_set), cfg.holdout, cfg.seed)
    return Subset(train_set, fit_idx), Subset(eval_set, hold_idx), f"{cfg.holdout:.0%} of {cfg.data}"


def train_dense_source(cfg: DenseSourceConfig) -> dict:
    seed_everything(cfg.seed)
    rt = Runtime.create(cfg.device, cfg.precision)
    train_set, selection_set, selection_name = selection_sets(cfg)
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    num_classes = base.num_classes

    backbone_kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    if cfg.output_stride is not None:
        backbone_kwargs["output_stride"] = cfg.output_stride
    head_kwargs = {"channels": cfg.head_channels} if cfg.head_channels else {}
    config = dense_model_config(cfg.backbone, cfg.head, num_classes, backbone_kwargs, head_kwargs,
                                image_size=cfg.crop_size)
    model = rt.prepare_module(SegmentationModel(cfg.backbone, cfg.head, num_classes, backbone_kwargs, head_kwargs))
    aux_weight = float(getattr(model.head, "aux_weight", 0.0))
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    lr0 = cfg.lr if cfg.lr is not None else (ADAM_LR if cfg.optimizer == "adam" else LR)
    optimizer = (torch.optim.Adam(lr_param_groups([(model, 1.0)], lr0), lr=lr0) if cfg.optimizer == "adam"
                 else segmentation_optimizer([(model, 1.0)], lr0, cfg.weight_decay, cfg.momentum))
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers)  # fixed-size crops batch
    selection_loader = eval_loader(selection_set, workers=cfg.workers)

    run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("source", cfg.backbone, cfg.head, f"s{cfg.seed}"))
    write_json(run_dir / "config.json", {"task": TASK, **dataclasses.asdict(cfg)})
    total_iters = max(1, cfg.epochs * len(loader))
    selection = Selection(total_iters, cfg.selection_checks, "miou", selection_name, len(loader))
    logger = RunLogger(run_dir, total=total_iters, desc=f"source {cfg.backbone}+{cfg.head}", progress=cfg.progress)
    batches, start = forever(loader), time.time()  # the official loop counts iterations, not epochs
    try:
        model.train()
        for step in range(1, total_iters + 1):
            images, masks, _ = next(batches)
            lr = set_group_lr(optimizer, poly_lr(lr0, (step - 1) / total_iters, cfg.poly_power))
            masks = masks.to(rt.device)
            if (masks != IGNORE_INDEX).any():  # a crop of padding only carries no labels
                with rt.autocast():
                    logits, aux = model.forward_train(rt.images(images))
                loss, terms = segmentation_loss(logits, aux, masks, aux_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step % 10 == 0 or step == total_iters:
                    logger.scalars("source", {"loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                                              "lr": lr}, step)
            logger.advance(1)
            if selection.due(step):
                scores = segmentation_pass(model, selection_loader, rt.scoring(), num_classes)
                logger.scalars("selection", {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]},
                               step)
                if selection.keeps(public_scores(scores), step):
                    save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {
                        "task": TASK, "model_config": config, "model": model.state_dict(), "source_data": cfg.data,
                        "class_names": list(base.class_names), **selection.best})
    finally:
        logger.close()
    metrics = {"task": TASK, "source_data": cfg.data, "backbone": cfg.backbone, "head": cfg.head,
               "num_classes": num_classes, "class_names": list(base.class_names), **selection.best,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT)}
    from .evaluate import evaluate_dense_model

    in_domain_test = builtin_scenes_test_split(cfg.data)   # built-in scenes: the in-domain figure to report
    if in_domain_test:
        metrics["test"] = evaluate_dense_model(run_dir / CHECKPOINT, in_domain_test, device=cfg.device)
    if cfg.eval_target:
        metrics["target"] = evaluate_dense_model(run_dir / CHECKPOINT, cfg.eval_target, device=cfg.device)
    write_json(run_dir / "metrics.json", metrics)
    return metrics
