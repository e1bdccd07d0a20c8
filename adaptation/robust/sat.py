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

Under torchrun each rank sees only its share b_r of the step's union batch U (|U| = N). Every rank
gathers the indices and softmax predictions of U and moves the targets of all of U, so all ranks hold
the table one process would hold after the union batches. The weights are rescaled over U, and rank
r's loss is scaled so that the mean of the ranks' losses (and so of their gradients, which
`take_step` averages) is one process's loss on U:

    w_i  = max_k t_ik * N / sum_{j in U} max_k t_jk
    L_r  = (R |b_r| / N) * 1/|b_r| sum_{i in b_r} w_i * CE(t_i, z_i),     1/R sum_r L_r = 1/N sum_{i in U} ...

(with R ranks of equal batches the factor is 1: each rank's loss is the mean over its own batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.distributed import SINGLE, Distributed

MOMENTUM = 0.9                 # alpha
START_FRACTION = 60 / 200      # E_s as a fraction of the run (60 of the paper's 200 epochs)


def start_epoch_for(epochs: int, fraction: float = START_FRACTION) -> int:
    """E_s for a run of `epochs` epochs: the paper's 60 of 200, scaled (at least one epoch of plain CE)."""
    return max(1, int(round(fraction * epochs)))


class SelfAdaptiveTargets:
    """The soft targets t (N, K) of a training set, and the SAT loss that updates them (on every rank alike)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, start_epoch: int, momentum: float = MOMENTUM,
                 dist: Distributed = SINGLE):
        self.targets = F.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes).float()
        self.start_epoch, self.momentum, self.dist = start_epoch, momentum, dist
        self.updates = 0  # samples whose target has been moved, summed over (union) batches

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on one batch (`epoch` counts from 0) and what to log; moves the (union) batch's targets."""
        if epoch < self.start_epoch:
            return F.cross_entropy(logits, labels), {}
        union = self.union(index, logits.device)
        probs = self.union(logits.detach().float().softmax(1), logits.device)
        self.targets[union] = self.momentum * self.targets[union] + (1 - self.momentum) * probs
        self.updates += len(union)
        targets = self.targets[index.cpu()].to(logits.device)
        confidence = self.targets[union].max(1).values.to(logits.device)
        weights = targets.max(1).values * (len(union) / confidence.sum())
        per_sample = -(targets * F.log_softmax(logits.float(), 1)).sum(1)
        share = len(index) * self.dist.world_size / len(union)  # exactly 1 in a world of one
        return (weights * per_sample).mean() * share, {"sample_weight_min": weights.min().detach(),
                                                       "target_confidence": targets.max(1).values.mean().detach()}

    def union(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every rank's rows in rank order, on the CPU (the table's device). The gather runs on the logits'
        device, since NCCL sends GPU tensors only."""
        if not self.dist.enabled:
            return rows.cpu()
        return self.dist.gather_cat(rows.to(device)).cpu()

    def state_dict(self) -> dict:
        return {"targets": self.targets, "start_epoch": self.start_epoch, "momentum": self.momentum,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state["targets"].shape != self.targets.shape:
            raise ValueError(f"saved SAT targets are {tuple(state['targets'].shape)} but this data set needs "
                             f"{tuple(self.targets.shape)}: resume on the same training data")
        self.targets = state["targets"].float().clone()
        self.start_epoch, self.momentum, self.updates = state["start_epoch"], state["momentum"], state["updates"]
