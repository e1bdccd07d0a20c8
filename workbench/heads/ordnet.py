"""ORDNet: middle-range and reweighted long-range attention."""

from __future__ import annotations

import torch
import torch.nn as nn

from workbench.layers import (MiddleRangeAttention, ReweightedLongRangeAttention)

from . import register_head
from .base import DenseHead, FeatureInput, conv_bn_relu


@register_head("ordnet")
class ORDNetHead(DenseHead):
    """ORDNet's omni-range head (Huang et al., IEEE TIP 2020): short, middle and long range.

        x  = ReLU(BN(conv3x3(features)))             local (short-range) features, 512
        m  = MiddleRange(x)       self-attention restricted to non-overlapping P x P patches (P = 8)
        l  = ReweightedLongRange(x)   global attention whose key j is reweighted by the attention it
                                      receives from the whole map, r_j = mean_i A_ij,
                                      A'_ij = A_ij r_j / sum_k A_ik r_k
        z  = Dropout2d_0.05(ReLU(BN(conv1x1(concat[x, m, l]))))         512
        logits = classifier(z);  aux head on the second-to-last map as in ISSA (weight 0.4)

    The paper has no public code and its abstract (all we could read, REFERENCE.md 8.3) fixes
    neither the patch size, the reweighting nor the fusion. Our choices, and why:
    - the stem (3x3 conv to 512), the attention widths (key 256, value 512), the concat-with-input
      fusion, the dropout and the aux head are the ISA head's, so the two heads differ only in the
      context they add (interlaced sparse vs. middle + reweighted long range) and compare cleanly;
    - the branches run in parallel on the same local features x, which stand for the short range
      ("local convolution"); concatenation lets the 1x1 fusion learn how much of each range to use;
    - P = 8 for the middle range: the ISA group size, i.e. 64-pixel windows at stride 8, longer
      than a 3x3 conv reaches and far shorter than the map;
    - the reweighting by mean received attention is the direct reading of "regions which have large
      correlations with others are emphasised" (workbench.layers.ordnet).
    """
    summary = "ORDNet (Huang et al. 2020): short-, middle- and reweighted long-range attention"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int = 512,
                 key_channels: int | None = None, value_channels: int | None = None, patch_size: int = 8,
                 dropout: float = 0.05, aux_channels: int | None = None, aux_weight: float = 0.4,
                 inputs: str = "auto"):
        super().__init__(feature_info, num_classes)
        key_channels = key_channels or channels // 2
        value_channels = value_channels or channels
        self.inputs = FeatureInput(feature_info, inputs)
        self.reduce = conv_bn_relu(self.inputs.channels, channels, 3)
        self.middle_range = MiddleRangeAttention(channels, key_channels, value_channels, patch_size)
        self.long_range = ReweightedLongRangeAttention(channels, key_channels, value_channels, channels)
        self.fuse = nn.Sequential(conv_bn_relu(3 * channels, channels), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self._make_aux(aux_channels or channels, dropout, aux_weight)

    def pixel_features(self, feats, with_aux=True):
        x = self.reduce(self.inputs(feats))
        z = self.fuse(torch.cat([x, self.middle_range(x), self.long_range(x)], dim=1))
        return z, self._aux_logits(feats, with_aux)
