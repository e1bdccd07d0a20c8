"""torchvision ResNets as backbones: pooled features, or the four stage maps for dense heads.

`pretrained=<file>` loads a torchvision-format state dict from a local file (nothing is
downloaded); the classification layer `fc.*` in the file is ignored. `features_only=True` makes
`forward` return the four stage maps (strides 4-32, described by `feature_info`).

`output_stride=16` or `8` turns the stride-2 convolutions of the last one or two stages into
stride 1 and dilates the 3x3 convolutions after them by the stride they replace (the "dilated
ResNet" of DeepLab and of the segmentation heads, e.g. ResNet-101-D8 at OS 8), so the stage maps
come out at strides 4, 8, 16, 16 or 4, 8, 8, 8 and `feature_info` says so. The weights are the
same tensors at every output stride, so ImageNet weights load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ..layers.cifs import CIFS
from . import register_backbone


def load_torchvision_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found: pass a local torchvision .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read pretrained weights {path} ({type(exc).__name__}): "
                         f"expected a torchvision state dict saved with torch.save") from None
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    expected = model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = [k for k in expected if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or mismatched:
        raise ValueError(f"pretrained weights {path} do not match {type(model).__name__}: "
                         f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mis-shaped "
                         f"tensors (e.g. {(missing + unexpected + mismatched)[:2]}); pass weights of the same "
                         f"architecture")
    model.load_state_dict(state, strict=False)


OUTPUT_STRIDES = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def dilate_basic_blocks(net: torchvision.models.ResNet, replace: list[bool]) -> None:
    """torchvision's `replace_stride_with_dilation` for BasicBlock stages, which torchvision refuses.

    The same rule as torchvision applies to Bottleneck stages: in a stage whose stride is replaced,
    the first block keeps the previous dilation (and loses its stride, in conv1 and the shortcut),
    the following blocks dilate by the accumulated factor. Padding = dilation keeps the map size.
    """
    dilation = 1
    for stage, dilate in zip((net.layer2, net.layer3, net.layer4), replace):
        if not dilate:
            continue
        previous, dilation = dilation, dilation * 2
        stage[0].conv1.stride = (1, 1)
        if stage[0].downsample is not None:
            stage[0].downsample[0].stride = (1, 1)
        for i, block in enumerate(stage):
            d = previous if i == 0 else dilation
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (d, d), (d, d)


class ResNetBackbone(nn.Module):
    """torchvision's ResNet trunk. With `cifs_classes` = K > 0, a CIFS block (workbench.layers.cifs) follows
    every block of the last stage, the first with a non-linear probe and the others linear, as in the CIFS
    paper's ResNet-18; each forward then leaves the probes' logits in `probe_logits`, and a trainer that sets
    `cifs_labels` to the batch's labels lets the probes read the true class, as the paper trains them."""

    def __init__(self, arch: str = "resnet50", pretrained: str | None = None, features_only: bool = False,
                 output_stride: int = 32, cifs_classes: int = 0):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {sorted(OUTPUT_STRIDES)}, not {output_stride}")
        self.features_only = features_only
        self.output_stride = output_stride
        replace = OUTPUT_STRIDES[output_stride]
        bottleneck = arch not in ("resnet18", "resnet34")
        net = getattr(torchvision.models, arch)(weights=None,
                                                replace_stride_with_dilation=replace if bottleneck else None)
        if not bottleneck:
            dilate_basic_blocks(net, replace)
        if pretrained:
            load_torchvision_weights(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.out_dim = net.fc.in_features
        widths = [stage[-1].conv3.out_channels if hasattr(stage[-1], "conv3") else stage[-1].conv2.out_channels
                  for stage in self.stages]
        self.feature_info = [{"channels": c, "reduction": min(4 * 2**i, output_stride)} for i, c in enumerate(widths)]
        self.cifs = nn.ModuleList([CIFS(widths[-1], cifs_classes, "nonlinear" if i == 0 else "linear")
                                   for i in range(len(self.stages[-1]))] if cifs_classes else [])
        self.cifs_labels: torch.Tensor | None = None
        self.probe_logits: list[torch.Tensor] = []

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs, at strides 4, 8, 16 and 32 (capped at the output stride)."""
        x = self.stem(x)
        maps = []
        for stage in self.stages[:-1] if self.cifs else self.stages:
            x = stage(x)
            maps.append(x)
        if self.cifs:
            self.probe_logits = []
            for block, select in zip(self.stages[-1], self.cifs):
                x, logits = select(block(x), self.cifs_labels)
                self.probe_logits.append(logits)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        maps = self.forward_features(x)
        if self.features_only:
            return maps
        return torch.flatten(nn.functional.adaptive_avg_pool2d(maps[-1], 1), 1)


def _register(arch: str) -> None:
    @register_backbone(arch)
    def build(pretrained: str | None = None, features_only: bool = False, output_stride: int = 32,
              cifs_classes: int = 0) -> ResNetBackbone:
        return ResNetBackbone(arch, pretrained, features_only, output_stride, cifs_classes)


for _arch in ("resnet18", "resnet50", "resnet101"):
    _register(_arch)
