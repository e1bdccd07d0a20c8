"""OCR: object-contextual representations."""

from __future__ import annotations

import torch.nn as nn

from workbench.layers import (ObjectContextAttention,
                              gather_object_regions)

from . import register_head
from .base import DenseHead, FeatureInput, conv_bn_relu


@register_head("ocr")
class OCRHead(DenseHead):
    """The object-contextual head of HRFormer's segmentation results (HRT_*_OCR_V2, Yuan et al. 2020):

        x   = concat of every branch upsampled to the highest resolution (480 channels for HRFormer-S)
        aux = conv1x1(ReLU(BN(conv3x3_512(x))))          soft object regions, K channels, loss weight 0.4
        p   = ReLU(BN(conv3x3_512(x)))                   pixel representations
        f_k = sum_i softmax_i(aux_ki) p_i                object region representations (gather)
        z   = OCR distribute(p, f): pixel-region attention with key 256, concat with p, 1x1 conv to
              512, BN-ReLU, Dropout2d 0.05              (workbench.layers.object_context)
        logits = classifier(z)

    The aux (soft region) head is part of the trainable feature part: z depends on it.
    """
    summary = "object-contextual representations (Yuan et al. 2020), HRFormer's OCR head"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int = 512,
                 key_channels: int | None = None, aux_channels: int | None = None, dropout: float = 0.05,
                 aux_weight: float = 0.4, inputs: str = "concat"):
        super().__init__(feature_info, num_classes)
        key_channels = key_channels or channels // 2          # 256 at the paper's width
        aux_channels = aux_channels or channels               # 512
        self.inputs = FeatureInput(feature_info, inputs)
        self.aux = nn.Sequential(conv_bn_relu(self.inputs.channels, aux_channels, 3),
                                 nn.Conv2d(aux_channels, num_classes, 1))
        self.aux_weight = float(aux_weight)
        self.reduce = conv_bn_relu(self.inputs.channels, channels, 3)
        self.object_context = ObjectContextAttention(channels, key_channels, channels, dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        x = self.inputs(feats)
        regions_logits = self.aux(x)
        p = self.reduce(x)
        z = self.object_context(p, gather_object_regions(p, regions_logits))
        return z, regions_logits
