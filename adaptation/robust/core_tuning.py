"""Core-tuning (Zhang, Hooi, Hu, Liang, Feng; NeurIPS 2021): contrast-regularised fine-tuning.

Fine-tuning a (contrastively) pre-trained encoder with cross-entropy plus a focal supervised
contrastive term on a projection head g, over the batch's embeddings and two kinds of mixed ones:

    hard negatives (smooth boundaries):  f' = (1 - l) f_i + l f_pi(i),   l = max(Beta(a, a), 0.8)
    hard positives:                      f'' = m f_hp(i) + (1 - m) f_hn(i),  m ~ Beta(a, a)
        hp(i): the least similar sample of i's class, hn(i): the most similar of another class
    labels mix with the same weights; the batch becomes [f; f'; f''] (3B rows).

    L = soft-CE(C([f; f'; f'']), y) + eta * L_focal
    L_focal = 1/|A| sum_{i in A} -1/N sum_{j != i, y_j = y_i} (1 - p_ij) log p_ij
    p_ij = exp(z_i . z_j / tau) / sum_{k != i} exp(z_i . z_k / tau),   z = g(f) / ||g(f)||

where "y_j = y_i" compares the (soft) label vectors exactly and A holds the rows with at least one
positive. As in the official code, the inner sum is divided by the number of rows N (not by the
number of positives). Published setting: tau 0.07, eta 0.1, a 1, batch 256, projection to 256-d.

The clean rows f of the batch [f; f'; f''] are detached from the encoder, in both terms: the official
code (github Vanint/Core-tuning, Core-tuning.py at 3547790, `feature_mixup`) starts the batch with
`list_f = features.clone().detach().requires_grad_(True)` and concatenates the mixes, built from the
undetached features, after it; that one batch feeds both the classifier (soft CE) and the projection
head (L_focal). The encoder is therefore trained through the mixes only, while the classifier and
the head still learn from the clean rows. `detach_clean=False` (not the official behaviour) lets the
clean rows' gradients reach the encoder too, as this module did before issue 34.

Here f is the workbench model's embedding (the bottleneck output that the classifier C reads), so
the saved model stays an ordinary source model that every adapter accepts; g lives beside it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPERATURE = 0.07
CONTRAST_WEIGHT = 0.1        # eta (README of the official code: --eta_weight 0.1)
MIX_ALPHA = 1.0
HARD_NEGATIVE_MIN_WEIGHT = 0.8
PROJECTION_DIM = 256
DETACH_CLEAN = True          # the official code's detached clean rows (module docstring)


class ProjectionHead(nn.Module):
    """g: Linear(d, d) - ReLU - Linear(d, 256), L2-normalised."""

    def __init__(self, dim: int, out_dim: int = PROJECTION_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


def focal_supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE
                                 ) -> torch.Tensor:
    """L_focal on normalised projections z (N, D); `labels` (N,) integer, or (N, K) soft label vectors
    (rows that are exactly equal count as the same class)."""
    if labels.dim() == 2:
        labels = torch.unique(labels, dim=0, return_inverse=True)[1]
    n = z.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    logits = z.float() @ z.float().T / temperature
    logits = logits.masked_fill(~not_self, float("-inf"))
    log_p = logits.log_softmax(dim=1).masked_fill(~not_self, 0.0)
    focal = (1 - log_p.exp()) * log_p * positives
    anchors = positives.any(dim=1)
    if not anchors.any():
        return z.sum() * 0.0
    return -(focal.sum(dim=1) / n)[anchors].mean()


def feature_mixup(features: torch.Tensor, onehot: torch.Tensor, alpha: float = MIX_ALPHA,
                  detach_clean: bool = DETACH_CLEAN) -> tuple[torch.Tensor, torch.Tensor]:
    """[f; hard-negative mixes; hard-positive mixes] (3B, d) and their mixed labels (3B, K); with
    `detach_clean` the first B rows (f) carry no gradient back to `features`, as in the official code."""
    b = features.shape[0]
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))

    def weights() -> torch.Tensor:
        return beta.sample((b, 1)).to(features.device)

    # hard negatives: a random partner dominates (weight >= 0.8) the mix
    partner = torch.randperm(b).to(features.device)
    lam = weights().clamp_min(HARD_NEGATIVE_MIN_WEIGHT)
    neg_f = (1 - lam) * features + lam * features[partner]
    neg_y = (1 - lam) * onehot + lam * onehot[partner]

    # hard positives: the least similar same-class sample mixed with the most similar other-class one
    with torch.no_grad():
        unit = F.normalize(features.float(), dim=1)
        similarity = unit @ unit.T
        same = onehot.argmax(1)[:, None] == onehot.argmax(1)[None, :]
        eye = torch.eye(b, dtype=torch.bool, device=features.device)
        hard_negative = similarity.masked_fill(same, float("-inf")).argmax(1)
        hard_positive = similarity.masked_fill(~same | eye, float("inf")).argmin(1)
        alone = ~(same & ~eye).any(1)                       # no other sample of its class: itself
        hard_positive[alone] = torch.arange(b, device=features.device)[alone]
        no_negative = same.all(1)                           # one class in the batch: no negative
        hard_negative[no_negative] = hard_positive[no_negative]
    m = weights()
    pos_f = m * features[hard_positive] + (1 - m) * features[hard_negative]
    pos_y = m * onehot[hard_positive] + (1 - m) * onehot[hard_negative]
    clean = features.detach() if detach_clean else features
    return torch.cat([clean, neg_f, pos_f]), torch.cat([onehot, neg_y, pos_y])


def core_tuning_loss(model: nn.Module, head: ProjectionHead, images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int, contrast_weight: float = CONTRAST_WEIGHT, alpha: float = MIX_ALPHA,
                     detach_clean: bool = DETACH_CLEAN) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Soft cross-entropy on the mixed batch plus eta * L_focal; `model` has .embed and .classifier.
    The encoder learns through the mixes only unless `detach_clean` is False (module docstring)."""
    features = model.embed(images)
    mixed_f, mixed_y = feature_mixup(features, F.one_hot(labels, num_classes).float(), alpha, detach_clean)
    classification = -(mixed_y * F.log_softmax(model.classifier(mixed_f).float(), 1)).sum(1).mean()
    contrast = focal_supervised_contrastive(head(mixed_f.float()), mixed_y)
    return classification + contrast_weight * contrast, {"classification": classification.detach(),
                                                         "contrastive": contrast.detach()}
