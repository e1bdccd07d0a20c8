"""Interlaced sparse self-attention (ISSA / ISANet)."""

from __future__ import annotations

import torch
import torch.nn as nn

from workbench.layers import (InterlacedSparseAttention, SelfAttention2d)

from . import register_head
from .base import DenseHead, FeatureInput, conv_bn_relu


@register_head("issa")
class ISSAHead(DenseHead):
    """The interlaced sparse self-attention head (Huang et al. 2019; openseg.pytorch's ISANet):

        x = ReLU(BN(conv3x3(features)))                                  channels 512
        c = ISA(x): long-range attention among positions spaced P apart, then short-range attention
            inside each P x P block (P = 8 x 8, symmetric zero padding, cropped), each with
            query/key 256 (two 1x1 conv-BN-ReLU each), value 512, output 1x1 conv-BN-ReLU 512
        z = Dropout2d_0.05(ReLU(BN(conv1x1(concat[x, c]))))              512
        logits = classifier(z)
        aux = 3x3 conv 512 -> BN-ReLU -> Dropout2d 0.05 -> 1x1 classifier on the second-to-last map
              (stage 3 of the ResNet), loss weight 0.4

    `attention="full"` replaces ISA by one global self-attention block of the same widths (the
    non-local baseline ISA is measured against; for benchmarks).
    """
    summary = "interlaced sparse self-attention (Huang et al. 2019, ISANet)"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int = 512,
                 key_channels: int | None = None, value_channels: int | None = None,
                 group_size: int | tuple[int, int] = (8, 8), dropout: float = 0.05,
                 aux_channels: int | None = None, aux_weight: float = 0.4, inputs: str = "auto",
                 attention: str = "interlaced"):
        super().__init__(feature_info, num_classes)
        key_channels = key_channels or channels // 2          # 256 at the paper's width
        value_channels = value_channels or channels           # 512
        group = (group_size, group_size) if isinstance(group_size, int) else tuple(group_size)
        self.inputs = FeatureInput(feature_info, inputs)
        self.reduce = conv_bn_relu(self.inputs.channels, channels, 3)
        if attention == "interlaced":
            self.context = InterlacedSparseAttention(channels, key_channels, value_channels, group, channels,
                                                     qk_layers=2, out_norm=True)
        elif attention == "full":
            self.context = SelfAttention2d(channels, key_channels, value_channels, channels, qk_layers=2,
                                           out_norm=True)
        else:
            raise ValueError(f"attention must be 'interlaced' or 'full', not {attention!r}")
        self.fuse = nn.Sequential(conv_bn_relu(2 * channels, channels), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self._make_aux(aux_channels or channels, dropout, aux_weight)

    def pixel_features(self, feats, with_aux=True):
        x = self.reduce(self.inputs(feats))
        return self.fuse(torch.cat([x, self.context(x)], dim=1)), self._aux_logits(feats, with_aux)
