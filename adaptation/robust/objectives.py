"""Source-training objectives: what `train-source --objective` minimises on each batch.

    ce           cross-entropy with label smoothing 0.1 (SHOT's source recipe; the default)
    sat          self-adaptive training (adaptation.robust.sat), for noisy labels
    core-tuning  soft cross-entropy on mixed embeddings + eta * focal supervised contrastive
                 (adaptation.robust.core_tuning), for fine-tuning a pretrained encoder
    at           PGD adversarial training (Madry et al.): cross-entropy on PGD examples
    cifs-at      AT of a ResNet with CIFS after its last-stage blocks, on the joint loss of
                 the network and its probes:  3/(beta + 1) * (CE(C) + beta/P sum_p CE(probe_p)),
                 beta = 2, the attack ascending the same joint loss (the CIFS code's setting)

The robust objectives use plain cross-entropy, as their papers do; the smoothing belongs to SHOT's
source recipe. Every objective trains the same ShotModel, so the checkpoint is an ordinary source
model that every adapter accepts; extra trained parts (Core-tuning's projection head, SAT's
targets) travel in the checkpoint beside it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.distributed import SINGLE, Distributed

from .adversarial import PGD, pgd_attack
from .core_tuning import CONTRAST_WEIGHT, ProjectionHead, core_tuning_loss
from .sat import SelfAdaptiveTargets, start_epoch_for

OBJECTIVES = ("ce", "sat", "core-tuning", "at", "cifs-at")
CIFS_PROBE_WEIGHT = 2.0  # beta (CIFAR10_Res18_CIFS.py --beta_cls, --beta_atk)


class Objective:
    """Cross-entropy with label smoothing; subclasses change the loss. `modules` are extra trained parts."""

    name = "ce"
    modules: dict[str, nn.Module] = {}

    def __init__(self, model: nn.Module, label_smoothing: float = 0.1):
        self.model, self.label_smoothing = model, label_smoothing

    def loss(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing), {}

    def state_dict(self) -> dict:
        return {name: module.state_dict() for name, module in self.modules.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state[name])


class SelfAdaptiveTraining(Objective):
    name = "sat"

    def __init__(self, model: nn.Module, train_labels, num_classes: int, epochs: int, dist: Distributed = SINGLE):
        super().__init__(model)
        # under torchrun every rank moves the targets of every rank's batch: one table, the same on all ranks
        self.targets = SelfAdaptiveTargets(torch.as_tensor(train_labels), num_classes, start_epoch_for(epochs),
                                           dist=dist)

    def loss(self, images, labels, index, epoch):
        loss, terms = self.targets.loss(self.model(images), labels, index, epoch)
        return loss, {**terms, "target_updates": torch.tensor(float(self.targets.updates))}

    def state_dict(self) -> dict:
        return {"targets": self.targets.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.targets.load_state_dict(state["targets"])


class CoreTuning(Objective):
    name = "core-tuning"

    def __init__(self, model: nn.Module, num_classes: int, contrast_weight: float = CONTRAST_WEIGHT):
        super().__init__(model)
        head = ProjectionHead(model.bottleneck.fc.out_features)
        self.modules = {"projection_head": head.to(next(model.parameters()).device)}
        self.num_classes, self.contrast_weight = num_classes, contrast_weight

    def loss(self, images, labels, index, epoch):
        return core_tuning_loss(self.model, self.modules["projection_head"], images, labels, self.num_classes,
                                self.contrast_weight)


@contextmanager
def evaluation_mode(model: nn.Module):
    """The attack runs with the network in eval mode (batch-norm statistics untouched), as the CIFS code."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cifs_backbone(model: nn.Module):
    backbone = model.backbone
    if not getattr(backbone, "cifs", None):
        raise ValueError("--objective cifs-at needs a ResNet backbone (resnet18, resnet50, resnet101): CIFS sits "
                         "after the blocks of its last stage")
    return backbone


class AdversarialTraining(Objective):
    name = "at"

    def __init__(self, model: nn.Module, style: str, attack: PGD = PGD()):
        super().__init__(model)
        self.style, self.attack = style, attack

    def adversarial(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with evaluation_mode(self.model):
            return pgd_attack(self.model, images, labels, self.attack, self.style)

    def loss(self, images, labels, index, epoch):
        adv = self.adversarial(images, labels)
        return F.cross_entropy(self.model(adv), labels), {}


def cifs_joint_loss(logits: torch.Tensor, probe_logits: list[torch.Tensor], labels: torch.Tensor,
                    beta: float = CIFS_PROBE_WEIGHT) -> torch.Tensor:
    """3/(beta + 1) * (CE(logits) + beta/P * sum_p CE(probe_p)): the network and its CIFS probes."""
    probes = sum(F.cross_entropy(p.float(), labels) for p in probe_logits) * (beta / len(probe_logits))
    return (F.cross_entropy(logits.float(), labels) + probes) * 3 / (beta + 1)


class CifsAdversarialTraining(AdversarialTraining):
    name = "cifs-at"

    def __init__(self, model: nn.Module, style: str, attack: PGD = PGD()):
        super().__init__(model, style, attack)
        self.backbone = cifs_backbone(model)

    def joint_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cifs_joint_loss(self.model(images), self.backbone.probe_logits, labels)

    def adversarial(self, images, labels):
        """PGD on the joint loss; in eval mode the probes read their own top prediction, not the label."""
        with evaluation_mode(self.model):
            return joint_pgd(self.joint_loss, images, labels, self.attack, self.style)

    def loss(self, images, labels, index, epoch):
        adv = self.adversarial(images, labels)
        self.backbone.cifs_labels = labels  # in training the probes' relevance reads the true class
        try:
            loss = self.joint_loss(adv, labels)
        finally:
            self.backbone.cifs_labels = None
        return loss, {"probe_accuracy": (self.backbone.probe_logits[-1].argmax(1) == labels).float().mean()}


def joint_pgd(loss_of, images, labels, attack: PGD, style: str) -> torch.Tensor:
    """pgd_attack ascending an arbitrary loss(images, labels) instead of the cross-entropy of logits."""
    return pgd_attack(None, images, labels, attack, style, loss_of=loss_of)


def build_objective(name: str, model: nn.Module, *, style: str, num_classes: int, train_labels=None,
                    epochs: int = 1, label_smoothing: float = 0.1, dist: Distributed = SINGLE) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    if name == "sat":
        return SelfAdaptiveTraining(model, train_labels, num_classes, epochs, dist=dist)
    if name == "core-tuning":
        return CoreTuning(model, num_classes)
    if name == "at":
        return AdversarialTraining(model, style)
    if name == "cifs-at":
        return CifsAdversarialTraining(model, style)
    return Objective(model, label_smoothing)
