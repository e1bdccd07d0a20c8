"""Dense segmentation heads behind one registry and one interface (their attention blocks: workbench.layers).

    from adaptation.dense.heads import create_head
    head = create_head("issa", backbone.feature_info, num_classes=19)
    logits, aux_logits = head(backbone.forward_features(images))   # at feature resolution

Interface (every head):

    pixel_features(feats) -> (z, aux_logits | None)   z: (N, D, h, w), the map that enters the classifier
    classifier            -> nn.Conv2d(D, K, 1) with bias, applied last:  logits = classifier(z)
    forward(feats)        -> (classifier(z), aux_logits | None)
    aux_weight            -> weight of the auxiliary loss in source training (0.0 without an aux head)

Everything but `classifier` is the trainable feature part: source-free adaptation freezes
`classifier` (SHOT's hypothesis) and adapts the rest, and `z` is SHOT's "bottleneck feature" for
clustering pixels. `features(feats)` is the same call as `pixel_features(feats)`. The auxiliary
logits, where a head has them, come at the resolution of the map the aux head reads, which may
differ from z's (e.g. stride 16 against stride 8): upsample each to the input separately.

Inputs. `feats` is the backbone's `forward_features` list and `feature_info` its description
([{"channels", "reduction"}, ...], finest first). Heads read it through `FeatureInput`:

    "last":    the deepest map;
    "concat":  every map bilinearly resized to the finest one and concatenated (HRNetV2, HRFormer);
    "auto":    "last" when its stride is at most 8 (a dilated ResNet at output stride 8, the
               setting of the FCN, ISA and ORDNet papers), otherwise every map resized to the
               stride-8 map and concatenated, i.e. the same output stride on backbones that keep
               every resolution (HRFormer, MobileNetV2): a stride-32 map alone is too coarse.

Defaults are the published values (REFERENCE.md 8.1-8.3): 512-channel heads, key 256, ISA groups
8 x 8, Dropout2d 0.05, aux weight 0.4. For tiny backbones scale them down with `channels=`
(key/value/aux widths follow it unless given).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.layers import (InterlacedSparseAttention, MiddleRangeAttention, ObjectContextAttention,
                              ReweightedLongRangeAttention, SelfAttention2d, gather_object_regions)

_HEADS: dict[str, Callable[..., "DenseHead"]] = {}
TASKS = ("segmentation", "pose")


def register_head(name: str, task: str = "segmentation"):
    """Register a head class under `name` for `task` (segmentation: logits per class; pose: heatmaps per joint)."""
    if task not in TASKS:
        raise ValueError(f"unknown dense task {task!r}: choose one of {', '.join(TASKS)}")

    def decorator(cls):
        if name in _HEADS:
            raise ValueError(f"head {name!r} registered twice")
        cls.task = task
        _HEADS[name] = cls
        return cls
    return decorator


def list_heads(task: str | None = None) -> list[str]:
    """Registered heads, all or those of one task."""
    return sorted(name for name, cls in _HEADS.items() if task is None or cls.task == task)


def create_head(name: str, feature_info: list[dict], num_classes: int, **kwargs) -> "DenseHead":
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}: choose one of {', '.join(list_heads())}")
    cls = _HEADS[name]
    try:
        inspect.signature(cls).bind(feature_info, num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"head {name!r} cannot be built with {sorted(kwargs)}: {exc}") from None
    return cls(feature_info, num_classes, **kwargs)


# ----------------------------------------------------------------------------------------- blocks

def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False (pixel centres), a no-op at the same size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                      align_corners=False)


INPUT_MODES = ("auto", "last", "concat")


class FeatureInput(nn.Module):
    """The backbone map(s) a head reads: "last", "concat" or "auto" (see the module docstring)."""

    def __init__(self, feature_info: list[dict], mode: str = "auto"):
        super().__init__()
        if mode not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, not {mode!r}")
        if not feature_info:
            raise ValueError("a dense head needs a non-empty feature_info")
        reductions = [f["reduction"] for f in feature_info]
        if mode == "auto":
            mode = "last" if reductions[-1] <= 8 else "concat"
            # the finest map at stride >= 8 sets the size; the last map qualifies, so one exists
            self.target = min((r, i) for i, r in enumerate(reductions) if r >= 8)[1] if mode == "concat" else None
        else:
            self.target = min((r, i) for i, r in enumerate(reductions))[1] if mode == "concat" else None
        self.mode = mode
        self.channels = (feature_info[-1]["channels"] if mode == "last"
                         else sum(f["channels"] for f in feature_info))
        self.reduction = reductions[-1] if mode == "last" else reductions[self.target]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "last":
            return feats[-1]
        size = feats[self.target].shape[-2:]
        return torch.cat([resize(f, size) for f in feats], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, channels={self.channels}, stride={self.reduction}"


class AuxiliaryHead(nn.Sequential):
    """3x3 conv -> BN -> ReLU -> Dropout2d -> 1x1 classifier: the deep-supervision head (PSPNet,
    ISA and ORDNet put it on the second-to-last stage, weight 0.4)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.05):
        super().__init__(conv_bn_relu(in_channels, channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, num_classes, 1))


# ------------------------------------------------------------------------------------------ heads

class DenseHead(nn.Module):
    """Feature part (`pixel_features`) + final 1x1 `classifier`; see the module docstring."""

    classifier: nn.Conv2d
    aux_weight: float = 0.0

    def __init__(self, feature_info: list[dict], num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, not {num_classes}")
        self.feature_info = [dict(f) for f in feature_info]
        self.num_classes = num_classes

    @property
    def feature_dim(self) -> int:
        """D, the channels of the pixel features entering the classifier."""
        return self.classifier.in_channels

    def pixel_features(self, feats: list[torch.Tensor], with_aux: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, aux_logits or None); with_aux=False may skip an aux head that z does not need."""
        raise NotImplementedError

    def features(self, feats: list[torch.Tensor], with_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.pixel_features(feats, with_aux)

    def forward(self, feats: list[torch.Tensor], with_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, aux = self.pixel_features(feats, with_aux)
        return self.classifier(z), aux

    def _make_aux(self, channels: int, dropout: float, aux_weight: float) -> None:
        """The aux head on the second-to-last map, when the backbone lists more than one."""
        if len(self.feature_info) > 1 and aux_weight > 0:
            self.aux = AuxiliaryHead(self.feature_info[-2]["channels"], channels, self.num_classes, dropout)
            self.aux_weight = float(aux_weight)
        else:
            self.aux, self.aux_weight = None, 0.0

    def _aux_logits(self, feats: list[torch.Tensor], with_aux: bool) -> torch.Tensor | None:
        return self.aux(feats[-2]) if with_aux and self.aux is not None else None


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


@register_head("hrnet")
class HRNetV2Head(DenseHead):
    """HRNetV2's segmentation head (Wang et al. 2019): every branch upsampled to the highest
    resolution and concatenated (720 channels for W48), then

        z = ReLU(BN(conv1x1(concat)))      width = the concatenated width unless `channels` is given
        logits = classifier(z)

    No aux head. Works on any backbone that lists several maps (with one map it is a 1x1 head).
    """

    def __init__(self, feature_info: list[dict], num_classes: int, channels: int | None = None,
                 inputs: str = "concat"):
        super().__init__(feature_info, num_classes)
        self.inputs = FeatureInput(feature_info, inputs)
        channels = channels or self.inputs.channels
        self.fuse = conv_bn_relu(self.inputs.channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pixel_features(self, feats, with_aux=True):
        return self.fuse(self.inputs(feats)), None


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


# ------------------------------------------------------------------------------- keypoint heads
# For pose the "classes" are the K joints and the logits are K heatmaps at 1/4 of the input
# (REFERENCE 8.2); the final 1x1 conv is the frozen hypothesis of source-free pose adaptation.

@register_head("heatmap", task="pose")
class HeatmapHead(DenseHead):
    """HRFormer's pose head (TopDownSimpleHead without deconvolutions): one 1x1 conv from the
    highest-resolution branch (stride 4) to K heatmaps. The feature part is the backbone alone.
    """

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
