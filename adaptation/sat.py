"""Self-adaptive training (Huang, Zhang, Zhang; NeurIPS 2020): learning through noisy labels.

Every training sample i keeps a soft target t_i, initialised to its (possibly noisy) one-hot
label. Before epoch E_s the loss is plain cross-entropy; from E_s on, each time sample i is in a
batch

    t_i <- alpha t_i + (1 - alpha) softmax(z_i)          (z_i the logits, no gradient)
    w_i  = max_k t_ik,  rescaled so that the batch's weights sum to the batch size
    L    = 1/B sum_i w_i * ( - sum_k t_ik log softmax(z_i)_k )

so the model's own (smoothed) predictions gradually replace labels it disagrees with, and samples
whose targets stay uncertain count less. Published setting: E_s = 60 of 200 epochs, alpha = 0.9
(CIFAR-10, 40% / 80% symmetric noise); `start_epoch_for` scales E_s to a run's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOMENTUM = 0.9                 # alpha
START_FRACTION = 60 / 200      # E_s as a fraction of the run (60 of the paper's 200 epochs)


def start_epoch_for(epochs: int, fraction: float = START_FRACTION) -> int:
    """E_s for a run of `epochs` epochs: the paper's 60 of 200, scaled (at least one epoch of plain CE)."""
    return max(1, int(round(fraction * epochs)))


class SelfAdaptiveTargets:
    """The soft targets t (N, K) of a training set, and the SAT loss that updates them."""

    def __init__(self, labels: torch.Tensor, num_classes: int, start_epoch: int, momentum: float = MOMENTUM):
        self.targets = F.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes).float()
        self.start_epoch, self.momentum = start_epoch, momentum
        self.updates = 0  # samples whose target has been moved, summed over batches

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on one batch (`epoch` counts from 0) and what to log; moves the batch's targets."""
        if epoch < self.start_epoch:
            return F.cross_entropy(logits, labels), {}
        index = index.cpu()
        probs = logits.detach().float().softmax(1).cpu()
        self.targets[index] = self.momentum * self.targets[index] + (1 - self.momentum) * probs
        self.updates += len(index)
        targets = self.targets[index].to(logits.device)
        weights = targets.max(1).values
        weights = weights * (len(weights) / weights.sum())
        per_sample = -(targets * F.log_softmax(logits.float(), 1)).sum(1)
        return (weights * per_sample).mean(), {"sample_weight_min": weights.min().detach(),
                                               "target_confidence": targets.max(1).values.mean().detach()}

    def state_dict(self) -> dict:
        return {"targets": self.targets, "start_epoch": self.start_epoch, "momentum": self.momentum,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state["targets"].shape != self.targets.shape:
            raise ValueError(f"saved SAT targets are {tuple(state['targets'].shape)} but this data set needs "
                             f"{tuple(self.targets.shape)}: resume on the same training data")
        self.targets = state["targets"].float().clone()
        self.start_epoch, self.momentum, self.updates = state["start_epoch"], state["momentum"], state["updates"]
