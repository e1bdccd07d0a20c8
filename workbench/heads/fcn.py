"""FCN (Long et al.) as mmsegmentation's FCNHead."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register_head
from .base import DenseHead, FeatureInput, conv_bn_relu


@register_head("fcn")
class FCNHead(DenseHead):
    """The fully convolutional baseline (Long et al. 2015) as mmsegmentation's FCNHead
    (mmseg/models/decode_heads/fcn_head.py, configs/_base_/models/fcn_r50-d8.py):

        y_0 = x                                       x: the input map, C_in channels
        y_i = ReLU(BN(conv3x3(y_{i-1})))              i = 1..num_convs, `channels` (512) each
        z   = ReLU(BN(conv3x3(concat[x, y_n])))       conv_cat: C_in + channels -> channels
                                                      (concat_input; z = y_n without it)
        logits = classifier(Dropout2d_0.1(z))         1x1 conv with bias (mmseg's cls_seg)

    Defaults are the decode head of fcn_r50-d8: num_convs 2, concat_input True, channels 512,
    dropout 0.1, kernel 3 (padding 1), convs without bias (BN follows). The 3x3 convs are
    `convs` (a Sequential of conv-BN-ReLU blocks), the fusion is `conv_cat`, both the trainable
    feature part; `classifier` is the last 1x1 conv, the part adaptation freezes, and the pixel
    features z are taken after the dropout (identity in eval mode). num_convs=0 passes x itself
    on (mmseg's Identity) and needs channels == C_in. num_convs=1, concat_input=False is the
    one-conv head this registry had before (and mmseg's auxiliary FCNHead). Not built here: the
    config's auxiliary FCN head on stage 3 (256 channels, weight 0.4).
    """
    summary = "FCN (Long et al. 2015), mmsegmentation's FCNHead: two 3x3 convs and the input concatenated"

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int = 512, dropout: float = 0.1,
                 inputs: str = "auto", num_convs: int = 2, concat_input: bool = True, kernel_size: int = 3):
        super().__init__(feature_info, num_classes)
        if num_convs < 0:
            raise ValueError(f"num_convs must be at least 0, not {num_convs}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (same padding), not {kernel_size}")
        self.inputs = FeatureInput(feature_info, inputs)
        cin = self.inputs.channels
        if num_convs == 0 and cin != channels:
            raise ValueError(f"num_convs=0 passes the input on, so channels must equal its {cin} channels, "
                             f"not {channels}")
        self.num_convs, self.concat_input = num_convs, bool(concat_input)
        self.convs = (nn.Sequential(*(conv_bn_relu(cin if i == 0 else channels, channels, kernel_size)
                                      for i in range(num_convs)))
                      if num_convs else nn.Identity())
        self.conv_cat = conv_bn_relu(cin + channels, channels, kernel_size) if self.concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        x = self.inputs(feats)
        z = self.convs(x)
        if self.conv_cat is not None:
            z = self.conv_cat(torch.cat([x, z], dim=1))
        return self.dropout(z), None
