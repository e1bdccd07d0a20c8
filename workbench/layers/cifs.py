"""CIFS: channel-wise importance-based feature selection (Yan et al., ICML 2021).

A probe classifier on the globally pooled feature map predicts the class. The gradient of two of
its logits with respect to the feature map, summed over positions, says how relevant each channel
is:

    r   = sum_{h,w} d(z_a + z_b) / d f_{:, h, w}       (a = the true class in training, else the top
                                                         prediction; b = the second prediction)
    m   = softmax(r)                                    (non-negative, summing to 1 per sample)
    out = f * m                                         (per channel)

as the official code does (github HanshuYAN/CIFS, models/nets/resnet_CIFS.py, CIFS._get_mask_with_graph
at its head 2e68025: `mask = F.softmax(mask.view(N,C), dim=1)`, with the relevance taken on a detached
copy of the features and the graph kept, so that the main loss trains the probe through the
multipliers). That code's first version (2d8217c) and one later commit (3a3f261) multiplied the
softmax by 2; the next commit (bb5ff7d) went back to the plain softmax, kept `* 2` as a commented-out
line and logged both runs (experiments/PAT_Res18_cifar10_CIFS: best PGD-20 51.58%,
PAT_Res18_cifar10_CIFS_softmax2: 51.60%), so x2 was an experiment variant, not the released model.
The probe's logits are returned too: CIFS trains each probe with its own cross-entropy beside the
network's (adversarially, with PGD, in the paper; adaptation.robust.adversarial).

The official ResNet-18 puts one CIFS after each of the two blocks of its last stage, the first with
a non-linear probe (pool, Linear(C, 128), Softplus(beta 5), Linear(128, K)), the second linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn

HIDDEN = 128


def make_probe(channels: int, num_classes: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(channels, num_classes)
    if kind == "nonlinear":
        return nn.Sequential(nn.Linear(channels, HIDDEN), nn.Softplus(beta=5), nn.Linear(HIDDEN, num_classes))
    raise ValueError(f"unknown CIFS probe {kind!r}: use linear or nonlinear")


class CIFS(nn.Module):
    def __init__(self, channels: int, num_classes: int, probe: str = "linear"):
        super().__init__()
        if num_classes < 2:
            raise ValueError("CIFS needs at least 2 classes (it reads the top two probe logits)")
        self.probe = make_probe(channels, num_classes, probe)

    def multipliers(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel multipliers m (N, C), probe logits (N, K)) for a feature map x (N, C, H, W)."""
        keep_graph = torch.is_grad_enabled()  # training (and attacks) let the main loss reach the probe
        with torch.enable_grad():
            pooled = x.detach().float().mean(dim=(2, 3)).requires_grad_(True)
            logits = self.probe(pooled)
            ranked = logits.topk(2, dim=1).indices
            first = labels if (self.training and labels is not None) else ranked[:, 0]
            rows = torch.arange(len(logits), device=logits.device)
            chosen = logits[rows, first].sum() + logits[rows, ranked[:, 1]].sum()
            # d/d(pooled) = sum over positions of d/d(feature map), as pooled is the positions' mean
            (relevance,) = torch.autograd.grad(chosen, pooled, create_graph=keep_graph)
        return torch.softmax(relevance, dim=1), self.probe(x.float().mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m, logits = self.multipliers(x, labels)
        return x * m.to(x.dtype)[:, :, None, None], logits
