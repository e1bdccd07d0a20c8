"""Source-free pose adaptation with a keypoint mean teacher (REFERENCE 8.5; UniFrame's train_human.py,
used without source data as SFDAHPE's intermediate model is).

    teacher <- source model; student <- source model, its final 1x1 conv frozen (the hypothesis)
    for every target batch of person crops:
        weak view   (teacher): the plain evaluation crop
        strong view (student): HRNet's random scale / rotation / flip + colour jitter of the same person
        teacher joints = argmax of its heatmaps on the weak view (quarter-pixel decoding), carried to
            the strong view's heatmap frame through both crop affines (left/right swapped when the
            strong view is mirrored) and re-rendered as sigma Gaussians
        mask = teacher maximum > median of the batch's maxima (mask ratio 0.5)
        L = lambda_c * JointsMSE(student(strong), pseudo heatmaps, mask)          lambda_c = 1
        Adam step on the student; teacher <- alpha teacher + (1 - alpha) student   alpha = 0.999, constant
                                                                                   (parameters only)

As in UniFrame's and SFDAHPE's code (OldWeightEMA over `parameters()`, the teacher in train mode),
the EMA covers parameters only: the teacher's batch-norm layers normalise its target batches with
the batch statistics and keep their own running averages of them (momentum 0.1), which is what the
saved teacher evaluates with; its other layers (dropout) predict in evaluation mode. The student
trains in training mode. The adapted model written at the end is the teacher (the smoother of the
two, as mean-teacher methods evaluate); unlike those scripts, no epoch is picked on target labels.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from workbench.checkpoint import save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from .keypoints import decode_heatmaps, gaussian_heatmaps, transform_points
from ..dense.model import load_dense_model
from .data import KeypointDataset, builtin_figures_test_split
from .evaluate import TASK, load_pose_data, pose_scores, predict_joints, public_pose_scores, skeleton_panel
from .source import joints_mse

METHODS = ("mean-teacher",)
DEFAULT_METHOD = "mean-teacher"
ADAPTED_KIND = "adapted-model"
CHECKPOINT = "adapted.pt"
# UniFrame and SFDAHPE (--teacher_alpha 0.999, constant, one EMA step per iteration); lr as SFDAHPE
EMA_ALPHA, MASK_RATIO, CONSISTENCY_WEIGHT, LR = 0.999, 0.5, 1.0, 1e-4
PANEL_PERSONS = 6


@dataclass
class PoseAdaptConfig(RunSettings):
    source: str = ""
    target: str = ""
    method: str = DEFAULT_METHOD
    epochs: int = 10
    batch_size: int = 32
    lr: float = LR
    ema_alpha: float = EMA_ALPHA
    mask_ratio: float = MASK_RATIO          # the fraction of joints (lowest teacher maxima) left out
    consistency_weight: float = CONSISTENCY_WEIGHT
    flip_test: bool = True
    test_on: str | None = None              # default: the built-in figures' test split
    precision: str = "fp32"                # fp32 | bf16 | auto (bf16 autocast where the hardware computes it)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not available for pose: choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.ema_alpha < 1.0 or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"ema_alpha and mask_ratio must lie in [0, 1), got {self.ema_alpha}, {self.mask_ratio}")


class TwoViews(Dataset):
    """Target persons as (weak view, strong view) pairs with the affines that relate them."""

    def __init__(self, data: KeypointDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        image = self.data.load_image(index)
        weak = self.data.view(index, image=image)
        aug = self.data.random_augmentation(np.random.default_rng(int(torch.randint(0, 2**62, ()).item())))
        strong = self.data.view(index, colour=True, image=image, **aug)
        return {"weak": weak.image, "strong": strong.image, "weak_matrix": torch.from_numpy(weak.matrix),
                "strong_matrix": torch.from_numpy(strong.matrix), "flipped": strong.flipped, "index": index}


def pseudo_heatmaps(teacher_heatmaps: torch.Tensor, weak_matrix: np.ndarray, strong_matrix: np.ndarray,
                    flipped: bool, flip_order, heatmap_size, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """One person's teacher heatmaps (K, h, w) on the weak view -> Gaussians at the teacher's joints in the
    strong view's frame (K, h, w), their maxima (K,) in the strong view's joint order."""
    coords, maxvals = decode_heatmaps(teacher_heatmaps[None])
    image_points = transform_points(coords[0].double().numpy(),
                                    np.linalg.inv(np.vstack([weak_matrix, [0.0, 0.0, 1.0]]))[:2])
    joints, maxvals = transform_points(image_points, strong_matrix), maxvals[0].numpy()
    if flipped:
        joints, maxvals = joints[flip_order], maxvals[flip_order]
    heatmaps, _ = gaussian_heatmaps(joints, np.ones(len(joints), bool), heatmap_size, sigma)
    return heatmaps, maxvals


def confident_mask(maxvals: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """1 for joints whose teacher maximum exceeds the `mask_ratio` quantile of the batch (the median at 0.5)."""
    return (maxvals > torch.quantile(maxvals.flatten(), mask_ratio)).float()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """teacher <- alpha teacher + (1 - alpha) student over the parameters; buffers (batch-norm statistics) are
    the teacher's own (see `batch_statistics`), as UniFrame's / SFDAHPE's OldWeightEMA leaves them."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        if s.requires_grad:  # the frozen classifier stays bit for bit the source's
            t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)


@contextlib.contextmanager
def batch_statistics(model: torch.nn.Module):
    """The model's batch-norm layers in training mode (batch statistics; running averages updated), the other
    layers as they are: the official teacher runs in train mode, and its pose ResNet has no dropout."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        yield model
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


class PoseMeanTeacher:
    def __init__(self, cfg: PoseAdaptConfig):
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.rt = Runtime.create(cfg.device, cfg.precision)
        self.student, self.source_state = load_dense_model(cfg.source, self.rt, task=TASK)
        mcfg = self.source_state["model_config"]
        self.target = load_pose_data(cfg.target, mcfg)
        self.test_on = cfg.test_on or builtin_figures_test_split(cfg.target)
        self.cfg = dataclasses.replace(cfg, test_on=self.test_on)
        self.test_set = load_pose_data(self.test_on, mcfg) if self.test_on else None
        self.run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("adapt", "pose", cfg.method,
                                                                           f"s{cfg.seed}"))
        for p in self.student.classifier.parameters():  # the source hypothesis stays fixed
            p.requires_grad_(False)
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=cfg.lr)
        n = len(self.target)
        self.loader = DataLoader(TwoViews(self.target), batch_size=cfg.batch_size, shuffle=True,
                                 drop_last=n % cfg.batch_size == 1, num_workers=cfg.workers)
        self.panel_indices = sorted({int(i) for i in np.linspace(0, n - 1, min(PANEL_PERSONS, n))})

    def scores(self, data: KeypointDataset | None) -> dict | None:
        if data is None:
            return None
        return pose_scores(predict_joints(self.teacher, data, self.rt.scoring(), self.cfg.flip_test), data)

    def step(self, batch: dict) -> dict[str, float]:
        with torch.no_grad(), self.rt.autocast(), batch_statistics(self.teacher.eval()):
            teacher_maps = self.teacher(self.rt.images(batch["weak"])).float().cpu()
        targets, maxvals = [], []
        for j in range(len(teacher_maps)):
            h, m = pseudo_heatmaps(teacher_maps[j], batch["weak_matrix"][j].numpy(), batch["strong_matrix"][j].numpy(),
                                   bool(batch["flipped"][j]), self.target.flip_order, self.target.heatmap_size,
                                   self.target.sigma)
            targets.append(torch.from_numpy(h))
            maxvals.append(torch.from_numpy(m))
        maxvals = torch.stack(maxvals).float()
        mask = confident_mask(maxvals, self.cfg.mask_ratio)
        self.student.train()
        with self.rt.autocast():
            student_maps = self.student(self.rt.images(batch["strong"])).float()
        loss = self.cfg.consistency_weight * joints_mse(student_maps, torch.stack(targets).to(self.rt.device),
                                                        mask.to(self.rt.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update(self.teacher, self.student, self.cfg.ema_alpha)
        return {"consistency": loss.item(), "kept_joints": mask.mean().item(), "teacher_max": maxvals.mean().item()}

    def _log_scores(self, logger: RunLogger, prefix: str, scores: dict | None, step: int) -> None:
        if scores is not None:
            logger.scalars(prefix, {"ap": scores["ap"], "pck@0.05": scores["pck@0.05"],
                                    "pck@0.1": scores["pck@0.1"]}, step)

    def run(self) -> dict:
        cfg = self.cfg
        write_json(self.run_dir / "config.json", {"task": TASK, **dataclasses.asdict(cfg)})
        total = max(1, cfg.epochs * len(self.loader))
        logger = RunLogger(self.run_dir, total=total, desc=f"{cfg.method} (pose)", progress=cfg.progress)
        start, step = time.time(), 0
        history = {"ap_per_epoch": [], "pck@0.1_per_epoch": []}
        try:
            before, test_before = self.scores(self.target), self.scores(self.test_set)
            self._log_scores(logger, "target", before, 0)
            self._log_scores(logger, "test", test_before, 0)
            for epoch in range(1, cfg.epochs + 1):
                for batch in self.loader:
                    step += 1
                    terms = self.step(batch)
                    if step % 10 == 0 or step == total:
                        logger.scalars("adapt", terms, step)
                    logger.advance(1)
                latest = self.scores(self.target)
                self._log_scores(logger, "target", latest, epoch)
                history["ap_per_epoch"].append(latest["ap"])
                history["pck@0.1_per_epoch"].append(latest["pck@0.1"])
                panel_joints = predict_joints(self.teacher, self.target, self.rt, cfg.flip_test)["joints"]
                logger.writer.add_image("target/true_green_predicted_red",
                                        skeleton_panel(self.target, panel_joints, self.panel_indices), epoch,
                                        dataformats="HWC")
            after, test_after = latest if cfg.epochs else before, self.scores(self.test_set)
            self._log_scores(logger, "test", test_after, cfg.epochs)
        finally:
            logger.close()
        metrics = {"task": TASK, "method": cfg.method, "source": str(cfg.source), "target": cfg.target,
                   "seed": cfg.seed, "persons": len(self.target), "joint_names": list(self.target.joint_names),
                   **public_pose_scores(before, "source_only_"), **public_pose_scores(after),
                   "test_data": self.test_on, "wall_seconds": time.time() - start,
                   "config": dataclasses.asdict(cfg), **history}
        if test_after is not None:
            metrics.update(public_pose_scores(test_before, "source_only_test_"))
            metrics.update(public_pose_scores(test_after, "test_"))
        (self.run_dir / "keypoints.json").write_text(json.dumps(after["results"]))  # COCO result file
        save_checkpoint(self.run_dir / CHECKPOINT, ADAPTED_KIND, {
            "task": TASK, "model_config": self.source_state["model_config"], "model": self.teacher.state_dict(),
            "method": cfg.method, "source": str(cfg.source), "target": cfg.target})
        write_json(self.run_dir / "metrics.json", metrics)
        return metrics
