"""HRNetV2's head: every resolution concatenated, then a 1x1 classifier."""

from __future__ import annotations

import torch.nn as nn

from . import register_head
from .base import DenseHead, FeatureInput, conv_bn_relu


@register_head("hrnet")
class HRNetV2Head(DenseHead):
    """HRNetV2's segmentation head (Wang et al. 2019): every branch upsampled to the highest
    resolution and concatenated (720 channels for W48), then

        z = ReLU(BN(conv1x1(concat)))      width = the concatenated width unless `channels` is given
        logits = classifier(z)

    No aux head. Works on any backbone that lists several maps (with one map it is a 1x1 head).
    """
    summary = "HRNetV2 (Wang et al. 2019): every branch upsampled and concatenated"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int | None = None,
                 inputs: str = "concat"):
        super().__init__(feature_info, num_classes)
        self.inputs = FeatureInput(feature_info, inputs)
        channels = channels or self.inputs.channels
        self.fuse = conv_bn_relu(self.inputs.channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        return self.fuse(self.inputs(feats)), None
