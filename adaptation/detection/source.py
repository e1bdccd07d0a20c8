"""Training the person detector from scratch: the recipe of torchvision's detection reference (SGD with
momentum 0.9, weight decay 1e-4, lr 0.02 for 16 images scaled linearly with the batch, a linear warm-up from
0.001 x lr, lr x 0.1 at 16/26 and 22/26 of the run), on the frames of the built-in crowds (or PoseTrack
data). The detector is checked `selection_checks` times on the selection split by COCO box AP and the last
of the best checks is kept, as every source run of the workbench; the kept model is then scored on the
test split, the figure to report.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.adapt.selection import Selection
from workbench.adapt.training import forever, lr_param_groups, set_group_lr
from workbench.checkpoint import save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from ..tracking.data import BUILTIN
from ..tracking.data import builtin_split as videos_split
from .data import BoxDataset, collate
from .evaluate import SOURCE_KIND, TASK, box_scores, evaluate_detector, predict_boxes
from .model import FRAME_SIZE, detector_config, person_detector

CHECKPOINT = "source.pt"
LR_PER_16_IMAGES, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 1e-4   # torchvision references/detection
WARMUP_FACTOR, WARMUP_STEPS = 1e-3, 1000                      # ... capped here at a tenth of the run
LR_STEPS, LR_FACTOR = (16 / 26, 22 / 26), 0.1                 # its 26-epoch schedule, as fractions


@dataclass
class DetectionSourceConfig(RunSettings):
    data: str = "builtin:crowds/flat"
    backbone: str = "resnet18"
    epochs: int = 12
    batch_size: int = 8
    lr: float | None = None                # default: 0.02 x batch / 16
    select_on: str | None = None           # default: the val split of the built-in crowds
    test_on: str | None = None             # default: the test split of the built-in crowds
    selection_checks: int = 4
    pretrained: str | None = None
    eval_target: str | None = None
    frame_size: int = FRAME_SIZE


def builtin_split(spec: str, split: str) -> str | None:
    """`builtin:crowds/<domain>:<split>` for a built-in spec, None for other data."""
    if not spec.startswith(BUILTIN):
        return None
    domain, _ = videos_split(spec)
    return f"{BUILTIN}{domain}:{split}"


def training_data(spec: str) -> str:
    """The built-in crowds train on their train split unless the spec names one."""
    return builtin_split(spec, "train") if spec.startswith(BUILTIN) and ":" not in spec[len(BUILTIN):] else spec


def learning_rate(lr0: float, step: int, total: int) -> float:
    """Linear warm-up over the first min(WARMUP_STEPS, total / 10) steps, then x0.1 at each LR_STEPS fraction."""
    warmup = max(1, min(WARMUP_STEPS, total // 10))
    factor = WARMUP_FACTOR + (1 - WARMUP_FACTOR) * min(1.0, step / warmup)
    return lr0 * factor * LR_FACTOR ** sum(step / total >= s for s in LR_STEPS)


def train_detector(cfg: DetectionSourceConfig) -> dict:
    cfg = dataclasses.replace(cfg, select_on=cfg.select_on or builtin_split(cfg.data, "val"),
                              test_on=cfg.test_on or builtin_split(cfg.data, "test"),
                              lr=cfg.lr or LR_PER_16_IMAGES * cfg.batch_size / 16)
    if not cfg.select_on:
        raise ValueError(f"{cfg.data}: pass --select-on (annotated videos to choose the kept checkpoint on; "
                         f"built-in crowds use their val split)")
    seed_everything(cfg.seed)
    rt = Runtime.create(cfg.device, "fp32")
    train_set = BoxDataset(training_data(cfg.data), train=True)
    selection_set = BoxDataset(cfg.select_on)
    detector = person_detector(cfg.backbone, cfg.pretrained, cfg.frame_size).to(rt.device)
    optimizer = torch.optim.SGD(lr_param_groups([(detector, 1.0)], cfg.lr), lr=cfg.lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=cfg.workers)
    if len(loader) == 0:
        raise ValueError(f"{cfg.data}: {len(train_set)} frames, fewer than one batch of {cfg.batch_size}: lower "
                         f"--batch-size")
    run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("source", TASK, cfg.backbone, f"s{cfg.seed}"))
    write_json(run_dir / "config.json", {"task": TASK, **dataclasses.asdict(cfg)})
    total = cfg.epochs * len(loader)
    selection = Selection(total, cfg.selection_checks, "ap", cfg.select_on, len(loader))
    logger = RunLogger(run_dir, total=total, desc=f"detector {cfg.backbone}", progress=cfg.progress)
    batches, start = forever(loader), time.time()
    try:
        detector.train()
        for step in range(1, total + 1):
            images, targets = next(batches)
            lr = set_group_lr(optimizer, learning_rate(cfg.lr, step - 1, total))
            losses = detector([i.to(rt.device) for i in images],
                              [{k: (v.to(rt.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                               for t in targets])
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the detector's loss is {loss.item()} at step {step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or step == total:
                logger.scalars("source", {"loss": loss.item(), "lr": lr,
                                          **{k: v.item() for k, v in losses.items()}}, step)
            logger.advance(1)
            if selection.due(step):
                scores = box_scores(selection_set, predict_boxes(detector, selection_set, rt.device))
                logger.scalars("selection", {"ap": scores["ap"], "ap50": scores["ap50"]}, step)
                if selection.keeps({k: v for k, v in scores.items() if k != "coco"}, step):
                    save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {
                        "task": TASK, "model_config": detector_config(cfg.backbone, cfg.frame_size),
                        "model": detector.state_dict(), "source_data": cfg.data, **selection.best})
                detector.train()
    finally:
        logger.close()
    metrics = {"task": TASK, "source_data": cfg.data, "backbone": cfg.backbone, **selection.best,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT)}
    for key, data in (("test", cfg.test_on), ("target", cfg.eval_target)):
        if data:
            metrics[key] = evaluate_detector(run_dir / CHECKPOINT, data, device=cfg.device)
    write_json(run_dir / "metrics.json", metrics)
    return metrics
