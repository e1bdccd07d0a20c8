"""torchvision ResNets as backbones: pooled features, or the four stage maps for dense heads.

`pretrained=<file>` loads a torchvision-format state dict from a local file (nothing is
downloaded); the classification layer `fc.*` in the file is ignored. `features_only=True` makes
`forward` return the four stage maps (strides 4-32, described by `feature_info`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

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


class ResNetBackbone(nn.Module):
    def __init__(self, arch: str = "resnet50", pretrained: str | None = None, features_only: bool = False):
        super().__init__()
        self.features_only = features_only
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            load_torchvision_weights(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.out_dim = net.fc.in_features
        widths = [stage[-1].conv3.out_channels if hasattr(stage[-1], "conv3") else stage[-1].conv2.out_channels
                  for stage in self.stages]
        self.feature_info = [{"channels": c, "reduction": 4 * 2**i} for i, c in enumerate(widths)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs, at strides 4, 8, 16 and 32."""
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        maps = self.forward_features(x)
        if self.features_only:
            return maps
        return torch.flatten(nn.functional.adaptive_avg_pool2d(maps[-1], 1), 1)


def _register(arch: str) -> None:
    @register_backbone(arch)
    def build(pretrained: str | None = None, features_only: bool = False) -> ResNetBackbone:
        return ResNetBackbone(arch, pretrained, features_only)


for _arch in ("resnet18", "resnet50", "resnet101"):
    _register(_arch)
