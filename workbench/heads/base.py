"""What every dense head is built from: the feature input, conv-BN-ReLU blocks, the auxiliary head, and
the DenseHead interface (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class DenseHead(nn.Module):
    """Feature part (`pixel_features`) + final 1x1 `classifier`; see the package docstring."""
    summary = ""  # one line for `workbench heads`

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


