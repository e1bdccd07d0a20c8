"""NRC (Yang, Wang, van de Weijer, Herranz, Jui; NeurIPS 2021, "Exploiting the Intrinsic Neighborhood Structure
for Source-free Domain Adaptation"): each target prediction is pulled towards the stored predictions of its
nearest neighbours in feature space (in the paper more strongly where the neighbourhood is reciprocal; in its
code, which made its figures, not: see below).

For a sample i of the batch, with p_i its softmax and s_j the score bank (workbench.adapt.neighbours):

    N_K(i)       its K nearest neighbours in the feature bank (itself left out)
    E(i)         the expanded neighbourhood: the KK nearest neighbours of every j in N_K(i)
    A_ij         affinity: 0.1 for every j in N_K(i) and every member of E(i), as the official code computes
                 it; with `reciprocal_weights` (the paper's weighting), for j in N_K(i) the number of times i is among
                 j's KK nearest neighbours (reciprocal neighbours), or 0.1 where it is not

    L = - mean_i sum_{j in N_K(i)} A_ij <p_i, s_j>  - mean_i sum_{m in E(i)} 0.1 <p_i, s_m>
        + sum_c pbar_c log(pbar_c + eps)                                  (pbar: the batch's mean p)

Why the official code's affinity is 0.1 throughout: it computes the reciprocal weights, then builds the
expanded neighbourhood's weights as `weight.unsqueeze(-1).expand(...)` and fills that with 0.1 in place;
the expanded tensor is a view of `weight`, so the fill overwrites the reciprocal weights too (checked in
PyTorch: `weight` reads 0.1 everywhere after the fill). Its published figures were made so, and this
workbench's default follows the code (`reciprocal_weights=False`); `--reciprocal-affinity` gives the paper's.

The dot products are computed as the official code computes them, F.kl_div(p_i, s_j) on probabilities (not
log-probabilities), which is s_j log s_j - <s_j, p_i>: the same gradient, with a constant added to the
logged value (the neighbourhood terms read positive); computed so, ours and the official loop take the same
steps (docs/RESULTS.md). It also trains the classifier C (a separate optimiser at the
same schedule), F at 0.1 x lr and B, C at lr. Settings per benchmark are the official scripts'
(NRC_DEFAULTS); the digits have none and take the VisDA-C neighbourhoods (the larger target), SHOT's
digits lr and epochs, and NRC's own multipliers: our choice, made before any run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.adapt.neighbours import MemoryBank

NON_RECIPROCAL_AFFINITY = 0.1   # the affinity of a neighbour that does not have i among its KK nearest
EXPANDED_AFFINITY = 0.1         # the affinity of every member of the expanded neighbourhood
EPSILON = 1e-5                  # inside the diversity term's log (--epsilon)

# K, KK, lr, epochs and schedule from Albert0147/NRC_SFDA: train_tar.py (VisDA-C: --K 5 --KK 5, lr 1e-3, 15
# epochs, SHOT's decay); office-home/train_tar.py with train_tar_oh.sh (--K 3 --KK 2, switched to K 5, KK 4 once
# more than half the steps are taken, lr 1e-3, 40 epochs, its lr_scheduler call commented out: a constant lr);
# office-31 through the same script as its comments say ("set to 2 on office-31", KK 3, 50 epochs, the switch
# commented out and the lr_scheduler call in: SHOT's decay). F at 0.1 x lr, B and C at lr in every script.
# late_*: K and KK after half the steps (None: no switch).
NRC_DEFAULTS = {
    "visda-c": dict(neighbours=5, expanded_neighbours=5, late_neighbours=None, late_expanded_neighbours=None,
                    lr=1e-3, epochs=15, constant_lr=False),
    "office-home": dict(neighbours=3, expanded_neighbours=2, late_neighbours=5, late_expanded_neighbours=4,
                        lr=1e-3, epochs=40, constant_lr=True),
    "office31": dict(neighbours=2, expanded_neighbours=3, late_neighbours=None, late_expanded_neighbours=None,
                     lr=1e-3, epochs=50, constant_lr=False),
    "digits": dict(neighbours=5, expanded_neighbours=5, late_neighbours=None, late_expanded_neighbours=None,
                   lr=1e-2, epochs=30, constant_lr=False),
}
BACKBONE_LR_MULT = 0.1


def nrc_loss(probs: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor, bank: MemoryBank, neighbours: int,
             expanded_neighbours: int, reciprocal_weights: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NRC's loss for a batch whose rows the bank already holds (`queries`: their normalised features);
    `reciprocal_weights` weighs reciprocal neighbours by their count (the paper), else every neighbour by 0.1 (the code)."""
    with torch.no_grad():
        near = bank.neighbours(queries, neighbours)                                       # (B, K)
        near_near = bank.neighbours(bank.features[near.flatten()], expanded_neighbours)   # (B*K, KK)
        near_near = near_near.view(len(idx), neighbours, expanded_neighbours)
        reciprocal = (near_near == idx.to(near_near.device)[:, None, None]).sum(-1).float()   # (B, K): i among j's KK
        affinity = torch.full_like(reciprocal, NON_RECIPROCAL_AFFINITY)
        if reciprocal_weights:
            affinity = torch.where(reciprocal > 0, reciprocal, affinity)
        near_scores = bank.scores[near].to(probs.device)                                  # (B, K, C)
        expanded_scores = bank.scores[near_near.flatten(1)].to(probs.device)              # (B, K*KK, C)
    # F.kl_div on probabilities is s (log s - p): -<p, s> plus a constant, written as the official code writes
    # it so that the two compute the same numbers step for step
    expanded = (F.kl_div(probs[:, None, :].expand_as(expanded_scores), expanded_scores, reduction="none").sum(-1)
                * EXPANDED_AFFINITY).sum(1).mean()
    neighbourhood = (F.kl_div(probs[:, None, :].expand_as(near_scores), near_scores, reduction="none").sum(-1)
                     * affinity.to(probs.device)).sum(1).mean()
    mean_prob = probs.mean(0)
    diversity = (mean_prob * torch.log(mean_prob + EPSILON)).sum()
    loss = expanded + neighbourhood + diversity   # the official code's order of summation
    return loss, {"neighbourhood": neighbourhood.detach(), "expanded_neighbourhood": expanded.detach(),
                  "negative_marginal_entropy": diversity.detach(), "total": loss.detach()}
