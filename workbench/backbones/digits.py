"""Small digit networks of the SHOT digits experiments (Liang et al. 2020).

- LeNet (28x28 grey in the paper): conv 20 k5 -> maxpool 2 -> relu -> conv 50 k5 -> dropout2d 0.5
  -> maxpool 2 -> relu -> flatten (800-d at 28x28).
- DTN (32x32 RGB): three conv k5 stride 2 with 64 / 128 / 256 channels, each followed by BatchNorm,
  dropout2d 0.1 / 0.3 / 0.5 and relu -> flatten (4096-d at 32x32). For dense heads the last two stage
  maps (strides 4 and 8, 128 and 256 channels; `forward_features`, described by `feature_info`; the
  stride-2 map is left out as ResNets leave out their stem): a segmentation backbone sized for the
  64 x 64 digit scenes on a CPU.

`in_channels` and `image_size` set the input; `out_dim` follows from them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register_backbone


def _flat_dim(net: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(net(torch.zeros(1, in_channels, image_size, image_size)).numel())


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(20, 50, kernel_size=5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten())
        self.out_dim = _flat_dim(self.features.eval(), in_channels, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class DTN(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32, output_stride: int = 8):
        super().__init__()
        if output_stride not in (4, 8):
            raise ValueError(f"DTN output_stride must be 8 (the digit network) or 4 (dense heads), not {output_stride}")
        layers, cin = [], in_channels
        for stage, (cout, drop) in enumerate(((64, 0.1), (128, 0.3), (256, 0.5))):
            # output stride 4: the last conv keeps the resolution and dilates by 2 instead (same receptive field)
            dilated = stage == 2 and output_stride == 4
            layers += [nn.Conv2d(cin, cout, kernel_size=5, stride=1 if dilated else 2, padding=4 if dilated else 2,
                                 dilation=2 if dilated else 1), nn.BatchNorm2d(cout), nn.Dropout2d(drop), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = _flat_dim(self.features.eval(), in_channels, image_size)
        self.feature_info = [{"channels": 128, "reduction": 4}, {"channels": 256, "reduction": output_stride}]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps after the second and third stage's relu (strides 4 and `output_stride`)."""
        stride4 = self.features[:8](x)
        return [stride4, self.features[8:12](stride4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_backbone("lenet")
def lenet(**kwargs) -> LeNet:
    return LeNet(**kwargs)


@register_backbone("dtn")
def dtn(**kwargs) -> DTN:
    return DTN(**kwargs)
