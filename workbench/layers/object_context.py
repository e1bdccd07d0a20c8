"""Object-contextual representations (OCR; Yuan, Chen, Wang, ECCV 2020), the head HRFormer's
segmentation results use.

Given pixel features x_i (C channels) and K soft object regions m_k (the logits of a coarse
auxiliary segmentation), OCR describes each pixel by the regions it is likely to belong to:

1. gather:     region representations   f_k = sum_i softmax_i(s * m_ki) x_i
               (softmax over the pixels of one image, s = 1: a soft, spatially normalised mask);
2. relation:   w_ik = softmax_k(phi(x_i) . psi(f_k) / sqrt(d)), with phi, psi two 1x1
               conv-BN-ReLU layers each (key width d = `key_channels`, 256 in the paper's heads);
3. distribute: y_i = rho(sum_k w_ik delta(f_k)), delta: 1x1 conv-BN-ReLU to d, rho: back to C;
4. fuse:       out_i = 1x1 conv-BN-ReLU(concat[y_i, x_i]) -> Dropout2d (0.05 in HRFormer's head).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gather_object_regions(features: torch.Tensor, region_logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """f_k = sum_i softmax_i(scale * m_ki) x_i:  (N, C, H, W), (N, K, H, W) -> (N, C, K)."""
    weights = torch.softmax(scale * region_logits.flatten(2), dim=2)   # (N, K, HW), each row sums to 1
    return features.flatten(2) @ weights.transpose(1, 2)              # (N, C, HW) @ (N, HW, K)


def _conv_bn_relu_1d(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]


def _conv_bn_relu_2d(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ObjectContextAttention(nn.Module):
    """Steps 2-4 above: pixels attend to the K region representations, concat with the pixels, fuse."""

    def __init__(self, channels: int, key_channels: int, out_channels: int, dropout: float = 0.05):
        super().__init__()
        self.pixel_query = nn.Sequential(*_conv_bn_relu_2d(channels, key_channels),
                                         *_conv_bn_relu_2d(key_channels, key_channels))       # phi
        self.region_key = nn.Sequential(*_conv_bn_relu_1d(channels, key_channels),
                                        *_conv_bn_relu_1d(key_channels, key_channels))        # psi
        self.region_value = nn.Sequential(*_conv_bn_relu_1d(channels, key_channels))          # delta
        self.up = nn.Sequential(*_conv_bn_relu_2d(key_channels, channels))                    # rho
        self.fuse = nn.Sequential(*_conv_bn_relu_2d(2 * channels, out_channels), nn.Dropout2d(dropout))

    def context(self, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """y = rho(softmax_k(phi(x) psi(f)^T / sqrt(d)) delta(f)): (N, C, H, W), (N, C, K) -> (N, C, H, W)."""
        n, _, h, w = x.shape
        q = self.pixel_query(x).flatten(2).transpose(1, 2)     # (N, HW, d)
        k = self.region_key(regions).transpose(1, 2)           # (N, K, d)
        v = self.region_value(regions).transpose(1, 2)         # (N, K, d)
        y = F.scaled_dot_product_attention(q, k, v)            # (N, HW, d)
        return self.up(y.transpose(1, 2).reshape(n, -1, h, w))

    def forward(self, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.context(x, regions), x], dim=1))
