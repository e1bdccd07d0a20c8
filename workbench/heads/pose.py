"""Keypoint heads: K heatmaps, one per joint."""

from __future__ import annotations

import math

import torch.nn as nn

from . import register_head
from .base import DenseHead


# ------------------------------------------------------------------------------- keypoint heads
# For pose the "classes" are the K joints and the logits are K heatmaps at 1/4 of the input
# (REFERENCE 8.2); the final 1x1 conv is the frozen hypothesis of source-free pose adaptation.

@register_head("heatmap", task="pose")
class HeatmapHead(DenseHead):
    """HRFormer's pose head (TopDownSimpleHead without deconvolutions): one 1x1 conv from the
    highest-resolution branch (stride 4) to K heatmaps. The feature part is the backbone alone.
    """
    summary = "HRFormer's pose head: one 1x1 conv to K heatmaps from the stride-4 map"

    def __init__(self, feature_info: list[dict], num_classes: int):
        super().__init__(feature_info, num_classes)
        finest = min(range(len(feature_info)), key=lambda i: feature_info[i]["reduction"])
        self.branch = finest
        self.classifier = nn.Conv2d(feature_info[finest]["channels"], num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        return feats[self.branch], None


@register_head("deconv", task="pose")
class DeconvHead(DenseHead):
    """SimpleBaseline's pose head (Xiao et al. 2018) on the deepest map:

        z = [ConvTranspose2d 4x4 stride 2 (256) -> BN -> ReLU] x n        logits = classifier(z) (1x1 conv)

    n = 3 on a stride-32 ResNet, as published; by default n is whatever brings the deepest map to
    stride 4 (log2(stride / 4)), so the heatmaps come out at 1/4 of the input on any backbone.
    """
    summary = "SimpleBaseline (Xiao et al. 2018): deconvolutions to stride 4, then K heatmaps"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int = 256,
                 num_deconv: int | None = None):
        super().__init__(feature_info, num_classes)
        reduction = feature_info[-1]["reduction"]
        if num_deconv is None:
            num_deconv = max(0, int(round(math.log2(reduction / 4))))
        layers, cin = [], feature_info[-1]["channels"]
        for _ in range(num_deconv):
            layers += [nn.ConvTranspose2d(cin, channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            cin = channels
        self.deconv = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        return self.deconv(feats[-1]), None
