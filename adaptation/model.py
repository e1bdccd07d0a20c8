"""The SHOT network split: feature extractor F (a registry backbone), bottleneck B, classifier C.

    B: Linear(d, 256) + BatchNorm1d(256)
    C: weight-normalised Linear(256, K)

Adaptation trains F and B and keeps C frozen: C's class prototypes are the hypothesis
that the target features are moved to match.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from workbench.backbones import create_backbone

BOTTLENECK_DIM = 256


class Bottleneck(nn.Module):
    def __init__(self, in_dim: int, dim: int = BOTTLENECK_DIM):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        linear = nn.Linear(dim, num_classes)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.fc = weight_norm(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ShotModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, bottleneck_dim: int = BOTTLENECK_DIM,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.bottleneck = Bottleneck(self.backbone.out_dim, bottleneck_dim)
        self.classifier = Classifier(bottleneck_dim, num_classes)
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features B(F(x))."""
        return self.bottleneck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def model_config(backbone: str, num_classes: int, bottleneck_dim: int = BOTTLENECK_DIM,
                 backbone_kwargs: dict | None = None, transform: str = "digits", image_size: int | None = None) -> dict:
    """Everything needed to rebuild a ShotModel and its input pipeline from a checkpoint."""
    return {"backbone": backbone, "num_classes": num_classes, "bottleneck_dim": bottleneck_dim,
            "backbone_kwargs": dict(backbone_kwargs or {}), "transform": transform, "image_size": image_size}


def build_model(config: dict) -> ShotModel:
    kwargs = {k: v for k, v in config["backbone_kwargs"].items() if k != "pretrained"}
    return ShotModel(config["backbone"], config["num_classes"], config["bottleneck_dim"], kwargs)
