"""CIFS: channel-wise importance-based feature selection (Yan et al., NeurIPS 2021).

A probe classifier on the pooled features predicts the class; the gradient of its top-k logits
with respect to the pooled features says how relevant each channel is to the prediction. A
softmax over the channels turns the relevances into non-negative multipliers (scaled so that
they average 1) that rescale the feature map. The probe's logits are returned too, so that it can
be trained with its own cross-entropy loss alongside the network (adversarially, with PGD, in
the paper).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CIFS(nn.Module):
    def __init__(self, channels: int, num_classes: int, top_k: int = 2, temperature: float = 1.0):
        super().__init__()
        self.probe = nn.Linear(channels, num_classes)
        self.top_k, self.temperature = min(top_k, num_classes), temperature

    def channel_relevance(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(relevance (N, C), probe logits (N, K)); differentiable when the graph is being built."""
        with torch.enable_grad():
            pooled = pooled if pooled.requires_grad else pooled.detach().requires_grad_(True)
            logits = self.probe(pooled)
            top = logits.topk(self.top_k, dim=1).values.sum()
            (relevance,) = torch.autograd.grad(top, pooled, create_graph=self.training)
        return relevance, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        relevance, logits = self.channel_relevance(x.mean(dim=(2, 3)))
        multipliers = torch.softmax(relevance / self.temperature, dim=1) * x.shape[1]
        return x * multipliers[:, :, None, None], logits
