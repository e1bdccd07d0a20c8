"""The SHOT network split: feature extractor F (a registry backbone), bottleneck B, classifier C.

    B: Linear(d, 256) + BatchNorm1d(256) [+ Dropout(0.5) for the digit networks]
    C: weight-normalised Linear(256, K)

Initialisation follows what the official code ends up with: B's linear layer Xavier-normal
with zero bias; C keeps PyTorch's default Linear weight (the official code calls Xavier on the
weight-normed layer's derived `weight`, which the next forward recomputes from g and v, so it
has no effect) with a zero bias. This sets the initial norm g of each class prototype, and with
it how sharp the source logits start.

Adaptation trains F and B and keeps C frozen: C's class prototypes are the hypothesis
that the target features are moved to match.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from workbench.backbones import create_backbone
from workbench.checkpoint import load_checkpoint

BOTTLENECK_DIM = 256
# The official digit network drops half the bottleneck units after its batch norm; the image one has no dropout.
BOTTLENECK_DROPOUT = {"digits": 0.5, "imagenet": 0.0}


class Bottleneck(nn.Module):
    def __init__(self, in_dim: int, dim: int = BOTTLENECK_DIM, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.bn(self.fc(x)))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        linear = nn.Linear(dim, num_classes)  # default weight init, see the module docstring
        nn.init.zeros_(linear.bias)
        self.fc = weight_norm(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ShotModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, bottleneck_dim: int = BOTTLENECK_DIM,
                 backbone_kwargs: dict | None = None, bottleneck_dropout: float = 0.0):
        super().__init__()
        self.backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.bottleneck = Bottleneck(self.backbone.out_dim, bottleneck_dim, bottleneck_dropout)
        self.classifier = Classifier(bottleneck_dim, num_classes)
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features B(F(x))."""
        return self.bottleneck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def model_config(backbone: str, num_classes: int, bottleneck_dim: int = BOTTLENECK_DIM,
                 backbone_kwargs: dict | None = None, transform: str = "digits", image_size: int | None = None,
                 bottleneck_dropout: float | None = None) -> dict:
    """Everything needed to rebuild a ShotModel and its input pipeline from a checkpoint."""
    if bottleneck_dropout is None:
        bottleneck_dropout = BOTTLENECK_DROPOUT[transform]
    return {"backbone": backbone, "num_classes": num_classes, "bottleneck_dim": bottleneck_dim,
            "backbone_kwargs": dict(backbone_kwargs or {}), "transform": transform, "image_size": image_size,
            "bottleneck_dropout": bottleneck_dropout}


def build_model(config: dict) -> ShotModel:
    kwargs = {k: v for k, v in config["backbone_kwargs"].items() if k != "pretrained"}
    # checkpoints written before the dropout was recorded had none
    return ShotModel(config["backbone"], config["num_classes"], config["bottleneck_dim"], kwargs,
                     config.get("bottleneck_dropout", 0.0))


MODEL_KINDS = ("source-model", "adapted-model")


def load_model(path, runtime):
    """(model in eval mode, checkpoint dict) of a classification source or adapted checkpoint."""
    state = load_checkpoint(path, kind=MODEL_KINDS, map_location=runtime.device)
    model = runtime.prepare_module(build_model(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state
