"""AaD (Yang, Jui, van de Weijer; NeurIPS 2022, "Attracting and Dispersing: A Simple Approach for Source-free
Domain Adaptation"): attract each prediction to its neighbours' stored predictions, disperse it from the
other predictions of the batch.

For a sample i of the batch, with p_i its softmax, s_j the score bank (workbench.adapt.neighbours) and
N_K(i) its K nearest neighbours in the feature bank (itself left out):

    L = - mean_i sum_{j in N_K(i)} <p_i, s_j>  +  lambda * mean_i sum_{j in batch, j != i} <p_i, p_j>
    lambda = alpha * (1 + 10 t / T)^(-beta)           (t: steps taken before this one, T: all steps)

Both p_i and p_j carry gradients in the dispersion term, as in the official code. The official code writes
the attraction as F.kl_div on probabilities: the same gradient, a constant more in the logged value (see
adaptation.classification.nrc). It trains C too, F at 0.1 x lr, B and C at lr. Settings per benchmark are
the official scripts' (AAD_DEFAULTS); the digits have none and take the VisDA-C settings with SHOT's
digits lr and epochs: our choice, made before any run.
"""

from __future__ import annotations

import torch

from workbench.adapt.neighbours import MemoryBank

# From Albert0147/AaD_SFDA: tar_adaptation.py (VisDA-C: --K 5, alpha 1, beta 5 with the decay on, lr 1e-3 under
# SHOT's decay, 15 epochs); office-home/train_tar.py with train_tar_oh.sh (--K 3, switched to K 2 once more than
# half the steps are taken, alpha 1 without decay, lr 1e-3 constant (--lr_decay off), 40 epochs);
# office-home/office31_tar.py with office31_tar.sh (--K 3 --beta 1: alpha 1 decayed with beta 1, its
# lr_scheduler call and its K switch commented out: constant lr and K, 50 epochs). dispersion_decay 0 is a
# constant weight; late_neighbours: K after half the steps (None: no switch). F at 0.1 x lr, B and C at lr in
# every script.
AAD_DEFAULTS = {
    "visda-c": dict(neighbours=5, late_neighbours=None, dispersion_weight=1.0, dispersion_decay=5.0, lr=1e-3,
                    epochs=15, constant_lr=False),
    "office-home": dict(neighbours=3, late_neighbours=2, dispersion_weight=1.0, dispersion_decay=0.0, lr=1e-3,
                        epochs=40, constant_lr=True),
    "office31": dict(neighbours=3, late_neighbours=None, dispersion_weight=1.0, dispersion_decay=1.0, lr=1e-3,
                     epochs=50, constant_lr=True),
    "digits": dict(neighbours=5, late_neighbours=None, dispersion_weight=1.0, dispersion_decay=5.0, lr=1e-2,
                   epochs=30, constant_lr=False),
}
BACKBONE_LR_MULT = 0.1


def dispersion_weight(steps_taken: int, total_steps: int, alpha: float, decay: float) -> float:
    """lambda = alpha (1 + 10 t / T)^-beta, at t steps taken of T."""
    return alpha * (1 + 10 * steps_taken / total_steps) ** (-decay)


def aad_loss(probs: torch.Tensor, queries: torch.Tensor, bank: MemoryBank, neighbours: int,
             weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AaD's loss for a batch whose rows the bank already holds (`queries`: their normalised features)."""
    with torch.no_grad():
        near_scores = bank.scores[bank.neighbours(queries, neighbours)].to(probs.device)   # (B, K, C)
    attraction = -(probs[:, None, :] * near_scores).sum(-1).sum(1).mean()
    similarity = probs @ probs.T
    dispersion = (similarity.sum(1) - similarity.diagonal()).mean()
    loss = attraction + weight * dispersion
    return loss, {"attraction": attraction.detach(), "dispersion": dispersion.detach(), "total": loss.detach()}
