"""The neighbourhood methods, NRC and AaD, on a classifier: SHOT's loop (workbench.adapt.loop) with a memory bank.

The bank (workbench.adapt.neighbours.MemoryBank) is written from the source model's evaluation of the whole
target before the first step; every step then writes the batch's normalised features and softmax scores
into it and looks their neighbours up, as the official code does. Unlike SHOT, the classifier C trains too
(F at 0.1 x lr, B and C at lr), and there are no pseudo-labels. The losses are in
adaptation.classification.nrc and .aad.

One process: the bank is the whole target's, and the ranks of a torchrun job would each hold a stale copy.
"""

from __future__ import annotations

import torch

from workbench.adapt.neighbours import MemoryBank
from workbench.adapt.training import set_group_lr
from workbench.arguments import given_or
from workbench.distributed import SINGLE, Distributed
from workbench.logging import RunLogger

from .aad import aad_loss, dispersion_weight
from .nrc import nrc_loss
from .shot import NEIGHBOURHOOD_METHODS, AdaptConfig, ShotAdapter


def create_adapter(cfg: AdaptConfig, dist: Distributed = SINGLE) -> ShotAdapter:
    """The adapter of `cfg.method`: NeighbourhoodAdapter for NRC and AaD, ShotAdapter for SHOT's methods."""
    return (NeighbourhoodAdapter if cfg.method in NEIGHBOURHOOD_METHODS else ShotAdapter)(cfg, dist)


class NeighbourhoodAdapter(ShotAdapter):
    def __init__(self, cfg: AdaptConfig, dist: Distributed = SINGLE):
        if dist.enabled:
            raise ValueError(f"--method {cfg.method} runs in one process (its memory bank holds the whole target): "
                             f"run it without torchrun")
        super().__init__(cfg, dist)
        for p in self.model.classifier.parameters():   # NRC and AaD train C as well
            p.requires_grad_(True)
        self.bank: MemoryBank | None = None
        self.step = 0

    def param_groups(self, logger: RunLogger, history: dict) -> list[tuple[torch.nn.Module, float]]:
        model = self.model
        return [(model.backbone, self.cfg.backbone_lr_mult), (model.bottleneck, 1.0), (model.classifier, 1.0)]

    def schedule(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
        self.step, self.total_steps = step, total
        if self.cfg.constant_lr:
            set_group_lr(optimizer, self.cfg.lr)
        else:
            super().schedule(optimizer, step, total)

    def epoch_labels(self, latest: dict, epoch: int, logger: RunLogger, history: dict) -> None:
        """No pseudo-labels; before the first epoch, the bank from the source model's evaluation."""
        if self.bank is None:
            self.bank = MemoryBank(latest["features"].to(self.rt.device), latest["probs"].to(self.rt.device),
                                   backend=self.cfg.cluster_backend)
        return None

    def neighbourhood_sizes(self) -> tuple[int, int | None]:
        """K and KK for this step: the late values once more than half the steps are taken (the official
        Office-Home loops test iter_num > 0.5 * max_iter with iter_num the steps taken before this one)."""
        cfg = self.cfg
        late = self.step - 1 > 0.5 * self.total_steps
        return (given_or(cfg.late_neighbours, cfg.neighbours) if late else cfg.neighbours,
                given_or(cfg.late_expanded_neighbours, cfg.expanded_neighbours) if late else cfg.expanded_neighbours)

    def batch_loss(self, batch, labels=None, prior=None) -> tuple[torch.Tensor, dict]:
        images, _, idx = batch
        features = self.model.embed(self.rt.images(images))
        probs = self.model.classifier(features).float().softmax(1)
        queries = self.bank.update(idx, features, probs)
        cfg = self.cfg
        neighbours, expanded = self.neighbourhood_sizes()
        if cfg.method == "nrc":
            return nrc_loss(probs, queries, idx, self.bank, neighbours, expanded,
                            reciprocal_weights=cfg.reciprocal_affinity)
        weight = dispersion_weight(self.step - 1, self.total_steps, cfg.dispersion_weight, cfg.dispersion_decay)
        return aad_loss(probs, queries, self.bank, neighbours, weight)
