"""Source training of a top-down pose model: the model that the pose mean teacher adapts.

The recipe of HRFormer's COCO pose configs (REFERENCE 8.2), with epochs scaled to the run:

    L  = JointsMSE = 1/K sum_k 0.5 mean_pixels (w_k (H_k - T_k))^2     (target weights w_k: 0 for an
                                                                       unlabelled joint)
    AdamW, lr 5e-4, weight decay 0.01, lr x0.1 at 170/210 and 200/210 of the run

with HRNet's scale / rotation / flip augmentation (adaptation.pose.data). The model is
selected as the segmentation and classification sources are: AP on the selection set is checked
`selection_checks` times and the last of the best checks is kept (`>=`). The selection set is the
val split for the built-in figures, otherwise a held-out 10% of the persons, or any `select_on`. The
kept model is then scored on `test_on` (default: the built-in figures' test split), the in-domain
figure to report; the selection scores are not.

The default model is SimpleBaseline (ResNet-18 + `deconv`), which a CPU trains on the figures in
minutes; HRFormer's own is `--backbone hrformer_t --head heatmap`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

from workbench.adapt.training import forever, lr_param_groups, make_loader, set_group_lr
from workbench.adapt.selection import Selection
from workbench.checkpoint import save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from ..common import split_holdout
from ..dense.model import PoseModel, dense_model_config
from .data import KeypointDataset, builtin_figures_test_split, builtin_figures_val_split
from .evaluate import TASK, pose_scores, predict_joints, public_pose_scores

SOURCE_KIND = "source-model"
CHECKPOINT = "source.pt"
LR, WEIGHT_DECAY, LR_STEPS, LR_FACTOR = 5e-4, 1e-2, (170 / 210, 200 / 210), 0.1   # HRFormer coco 256x192


def joints_mse(heatmaps: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """HRNet's JointsMSELoss with target weights: mean over joints of 0.5 * MSE of the weighted heatmaps."""
    w = weights[:, :, None, None]
    return 0.5 * ((heatmaps * w - targets * w) ** 2).mean()


def step_lr(lr0: float, progress: float) -> float:
    """lr0, times 0.1 after each of the LR_STEPS fractions of the run."""
    return lr0 * LR_FACTOR ** sum(progress >= s for s in LR_STEPS)


@dataclass
class PoseSourceConfig(RunSettings):
    data: str = "builtin:figures/flat"
    backbone: str = "resnet18"
    head: str = "deconv"
    head_channels: int | None = None       # None: the head's published width (256 for deconv)
    input_size: tuple[int, int] | None = None   # (width, height); None: 96 x 128 for the figures, 192 x 256 else
    epochs: int = 30
    batch_size: int = 32                   # HRFormer: 32 per GPU
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    holdout: float = 0.1
    select_on: str | None = None           # default: the val split of the built-in figures
    test_on: str | None = None             # in-domain report; default: the test split of the built-in figures
    selection_checks: int = 5
    flip_test: bool = True
    pretrained: str | None = None
    eval_target: str | None = None         # report PCK / AP on this data at the end
    precision: str = "fp32"                # fp32 | bf16 | auto (bf16 autocast where the hardware computes it)


def pose_selection_sets(cfg: PoseSourceConfig):
    """(training set, selection set (evaluation mode), selection data name)."""
    train_set = KeypointDataset(cfg.data, train=True, input_size=cfg.input_size)
    select_on = cfg.select_on or builtin_figures_val_split(cfg.data)
    if select_on:
        return train_set, KeypointDataset(select_on, train=False, num_joints=train_set.num_joints,
                                          input_size=train_set.input_size), select_on
    if len(train_set) < 2:
        raise ValueError(f"{cfg.data} holds {len(train_set)} person: a held-out selection set needs at least 2 "
                         f"(or pass --select-on)")
    fit_idx, hold_idx = split_holdout(len(train_set), cfg.holdout, cfg.seed)
    return Subset(train_set, fit_idx), HeldOut(cfg.data, train_set, hold_idx), f"{cfg.holdout:.0%} of {cfg.data}"


class HeldOut(KeypointDataset):
    """The held-out persons of a data set, in evaluation mode (metrics read their annotations)."""

    def __init__(self, spec: str, full: KeypointDataset, indices):
        super().__init__(spec, train=False, num_joints=full.num_joints, input_size=full.input_size)
        self.records = [self.records[i] for i in indices]


def train_pose_source(cfg: PoseSourceConfig) -> dict:
    cfg = dataclasses.replace(cfg, select_on=cfg.select_on or builtin_figures_val_split(cfg.data),
                              test_on=cfg.test_on or builtin_figures_test_split(cfg.data))   # config.json: resolved
    seed_everything(cfg.seed)
    rt = Runtime.create(cfg.device, cfg.precision)
    train_set, selection_set, selection_name = pose_selection_sets(cfg)
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    num_joints = base.num_joints

    backbone_kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    head_kwargs = {"channels": cfg.head_channels} if cfg.head_channels else {}
    config = dense_model_config(cfg.backbone, cfg.head, num_joints, backbone_kwargs, head_kwargs,
                                image_size=list(base.input_size), task=TASK)
    config.update(joint_names=list(base.joint_names), flip_pairs=[list(p) for p in base.flip_pairs])
    model = rt.prepare_module(PoseModel(cfg.backbone, cfg.head, num_joints, backbone_kwargs, head_kwargs))
    optimizer = torch.optim.AdamW(lr_param_groups([(model, 1.0)], cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers)

    run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("source", "pose", cfg.backbone, cfg.head,
                                                                  f"s{cfg.seed}"))
    write_json(run_dir / "config.json", {"task": TASK, **dataclasses.asdict(cfg)})
    total_iters = max(1, cfg.epochs * len(loader))
    selection = Selection(total_iters, cfg.selection_checks, "ap", selection_name, len(loader))
    logger = RunLogger(run_dir, total=total_iters, desc=f"source {cfg.backbone}+{cfg.head}", progress=cfg.progress)
    batches, start = forever(loader), time.time()  # the official loop counts iterations, not epochs
    try:
        model.train()
        for step in range(1, total_iters + 1):
            batch = next(batches)
            lr = set_group_lr(optimizer, step_lr(cfg.lr, (step - 1) / total_iters))
            with rt.autocast():
                heatmaps = model(rt.images(batch["image"]))
            loss = joints_mse(heatmaps.float(), batch["heatmaps"].to(rt.device), batch["weights"].to(rt.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or step == total_iters:
                logger.scalars("source", {"loss": loss.item(), "lr": lr}, step)
            logger.advance(1)
            if selection.due(step):
                scores = pose_scores(predict_joints(model, selection_set, rt.scoring(), cfg.flip_test), selection_set)
                logger.scalars("selection", {"ap": scores["ap"], "pck@0.05": scores["pck@0.05"],
                                             "pck@0.1": scores["pck@0.1"]}, step)
                if selection.keeps(public_pose_scores(scores), step):
                    save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {
                        "task": TASK, "model_config": config, "model": model.state_dict(), "source_data": cfg.data,
                        "joint_names": list(base.joint_names),
                        **{k: v for k, v in selection.best.items() if k != "coco"}})
    finally:
        logger.close()
    metrics = {"task": TASK, "source_data": cfg.data, "backbone": cfg.backbone, "head": cfg.head,
               "num_joints": num_joints, "joint_names": list(base.joint_names), **selection.best,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT)}
    from .evaluate import evaluate_pose_model

    for key, data in (("test", cfg.test_on), ("target", cfg.eval_target)):
        if data:
            metrics[key] = evaluate_pose_model(run_dir / CHECKPOINT, data, device=cfg.device, flip_test=cfg.flip_test)
    write_json(run_dir / "metrics.json", metrics)
    return metrics
