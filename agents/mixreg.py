"""mixreg: mixture regularisation (Wang, Kang, Shao, Feng; NeurIPS 2020).

Train on convex combinations of observations from different levels and
interpolate the supervision with the same per-sample weight:

    lam_i ~ Beta(alpha, alpha),  j = perm(i)
    dominant sample = the one whose weight is >= 0.5   (so lam_i := max(lam_i, 1 - lam_i))
    x~_i = lam_i * x_dom + (1 - lam_i) * x_other
    y~_i = lam_i * y_dom + (1 - lam_i) * y_other   for every interpolated target y
    discrete quantities (action, discount, replay index) come from the dominant sample

These are functions of a batch, not forks of the algorithms: PPO calls
`mix_batch` on every minibatch, Rainbow on every replay batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.mixing import sample_beta

DEFAULT_ALPHA = 0.2


@dataclass
class MixIndices:
    """Who is mixed with whom: x~ = lam * x[dominant] + (1 - lam) * x[other], lam >= 0.5."""

    lam: torch.Tensor       # (B,) float, in [0.5, 1]
    dominant: torch.Tensor  # (B,) long
    other: torch.Tensor     # (B,) long

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Interpolate any per-sample tensor (observations, returns, distributions ...) in float."""
        lam = self.lam.view(-1, *([1] * (x.dim() - 1)))
        return lam * x[self.dominant].float() + (1.0 - lam) * x[self.other].float()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Take the dominant sample's value (actions, discounts, replay indices)."""
        return x[self.dominant]


def draw_mix(batch_size: int, alpha: float = DEFAULT_ALPHA, device: torch.device | str = "cpu") -> MixIndices:
    lam = sample_beta(alpha, batch_size, device)
    i = torch.arange(batch_size, device=device)
    j = torch.randperm(batch_size, device=device)
    first_dominates = lam >= 0.5
    return MixIndices(lam=torch.where(first_dominates, lam, 1.0 - lam),
                      dominant=torch.where(first_dominates, i, j),
                      other=torch.where(first_dominates, j, i))


def mix_batch(batch: dict[str, torch.Tensor], mixed_keys: tuple[str, ...], taken_keys: tuple[str, ...],
              alpha: float = DEFAULT_ALPHA) -> tuple[dict[str, torch.Tensor], MixIndices]:
    """Mix `mixed_keys` with per-sample weights and take `taken_keys` from the dominant sample.

    Keys in neither tuple are dropped, so a caller cannot forget to decide.
    """
    size = next(iter(batch.values())).shape[0]
    device = next(iter(batch.values())).device
    idx = draw_mix(size, alpha, device)
    out = {k: idx.mix(batch[k]) for k in mixed_keys}
    out.update({k: idx.take(batch[k]) for k in taken_keys})
    return out, idx


# PPO: observations and every quantity of the loss are interpolated; the action is the dominant one.
PPO_MIXED_KEYS = ("obs", "returns", "advantages", "old_values", "old_logprobs")
PPO_TAKEN_KEYS = ("actions",)


def mix_ppo_minibatch(batch: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA):
    """mixreg for a PPO minibatch; advantages are normalised afterwards by the PPO loss."""
    return mix_batch(batch, PPO_MIXED_KEYS, PPO_TAKEN_KEYS, alpha)


# Rainbow: observations are interpolated and, with the same weight, the targets. How (`targets`):
#   "paper"      the paper's code: the target network's next-state distributions of every action and the n-step
#                returns are interpolated; the double-Q next action and the discount come from the dominant
#                sample, and the loss projects the mixed distribution once (agents.rainbow.Rainbow.loss);
#   "projected"  each sample's projected target distribution ("target") is interpolated.
# Either way the action, the replay index for the priority update and its importance weight come from
# the dominant sample.
MIXREG_TARGETS = ("paper", "projected")
RAINBOW_MIXED_KEYS = {"paper": ("obs", "next_dists", "returns"), "projected": ("obs", "target")}
RAINBOW_TAKEN_KEYS = {"paper": ("actions", "next_actions", "discounts", "index", "weights"),
                      "projected": ("actions", "index", "weights")}


def mix_rainbow_batch(batch: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA, targets: str = "paper"):
    """mixreg for a Rainbow replay batch, its targets mixed as `targets` says (see above)."""
    return mix_batch(batch, RAINBOW_MIXED_KEYS[targets], RAINBOW_TAKEN_KEYS[targets], alpha)
