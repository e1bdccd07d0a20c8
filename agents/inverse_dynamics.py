"""PAD's inverse-dynamics head (Hansen et al., ICLR 2021, "Self-Supervised Policy Adaptation during
Deployment"), for the discrete actions of Procgen.

The head g sees the encoder features of two consecutive frames and predicts the action taken between them:

    a_hat_t = g([phi(s_t), phi(s_{t+1})])                    g: Linear(2d, 1024) - ReLU - Linear(1024, 1024)
                                                                - ReLU - Linear(1024, |A|)
    L_inv   = sum_t c_t CE(a_hat_t, a_t) / sum_t c_t          c_t = 1 when s_{t+1} continues s_t's episode

Procgen resets a finished episode by itself, so the frame after an episode's last step is the next episode's
first: no action leads there, and those transitions (c_t = 0) are left out.

Training adds `AUX_WEIGHT * L_inv` to the agent's loss, with g on the agent's own encoder phi (the 256-d
features its policy or Q heads read). Gradients of L_inv reach phi through both phi(s_t) and phi(s_{t+1}).
At deployment (agents.adapt.pad) L_inv alone trains phi and g on the target domain.

From the official code (nicklashansen/policy-adaptation-during-deployment):
- the head is InvFunction (src/agent/agent.py L167-180): the MLP above over the concatenated features, with
  hidden_dim 1024 (src/arguments.py L20), orthogonal weights and zero biases (weight_init, agent.py L63-68,
  applied at L338). Its loss is an MSE because DMControl's actions are continuous (agent.py L494); with
  discrete actions it is the cross-entropy over the 15 actions.
- it has no loss weight: update_inv (agent.py L487-506) takes its own Adam steps on the encoder and head at the
  RL's learning rate (ss_lr = encoder_lr = 1e-3 = actor_lr = critic_lr, arguments.py L28-49), i.e. the
  inverse-dynamics loss counts as much as the RL loss; summed into one loss, that is weight 1. PAD takes that
  step at every second SAC update (ss_update_freq 2, arguments.py L50; agent.py L563); here the term is in
  every update's loss.
- its encoder shares the first num_shared_layers conv layers with the policy's (encoder.py L81-86; 8 of 11 in
  scripts/train.sh) and has its remaining layers to itself. Here g reads the policy's whole encoder, as the
  issue asks ("on the shared encoder"): phi is the IMPALA trunk, no deeper layers are left to split off.
- deployment: an Adam step at lr 1e-3 (arguments.py L42, L49) after every environment step, on a batch of 32
  (pad_batch_size, arguments.py L70) random crops of the transition just played (eval.py L56-64).
- the crops: PAD trains the head on randomly cropped frames too (utils.py L85-86, random_crop of obs and
  next_obs), so the crops it adapts on at deployment are inputs it has learnt from. `aux_crop` (on by default
  with train_procgen.py --aux) does the same here with the Procgen crop, one window per transition shared by
  s_t and s_{t+1} (agents.adapt.pad says why); the policy's own input is left as it is. Deployment crops
  exactly when the source was trained so (an agent trained without crops adapts on its plain frames).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .regularizers import RandomCrop

INVERSE_DYNAMICS = "inverse-dynamics"
AUX_TASKS = ("none", INVERSE_DYNAMICS)   # train_procgen.py --aux
HIDDEN_DIM = 1024      # the head's hidden width: PAD's hidden_dim (src/arguments.py L20)
AUX_WEIGHT = 1.0       # weight of L_inv beside the RL loss: PAD steps it at full weight (see above)
PAD_LR = 1e-3          # deployment's Adam learning rate: PAD's encoder_lr and ss_lr (src/arguments.py L42, L49)
PAD_BATCH_SIZE = 32    # online deployment's batch of augmented copies of one transition (arguments.py L70)


def cropped_transitions(frames: torch.Tensor, next_frames: torch.Tensor, crop: RandomCrop | None = None):
    """PAD's augmentation of the head's input: every transition (s_t, s_{t+1}) randomly cropped, one window per
    transition shared by both frames (uint8 (N, 64, 64, 3) each)."""
    crop = crop or RandomCrop()
    crop.resample(len(frames), frames.device)
    return crop(frames), crop(next_frames)


class InverseDynamicsHead(nn.Module):
    """g(phi(s_t), phi(s_{t+1})) -> action logits; PAD's InvFunction with its initialisation."""

    def __init__(self, feature_dim: int, num_actions: int, hidden_dim: int = HIDDEN_DIM):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(2 * feature_dim, hidden_dim), nn.ReLU(),
                                   nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                   nn.Linear(hidden_dim, num_actions))
        for layer in self.trunk:
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor, next_features: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the encoder ran in, as the agents' own heads
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.trunk(torch.cat([features.float(), next_features.float()], dim=1))


def inverse_dynamics_loss(logits: torch.Tensor, actions: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
    """L_inv: the mean cross-entropy over the transitions that stay within an episode (c_t = 1); zero, with a
    gradient of zeros, when none does."""
    per_transition = F.cross_entropy(logits.float(), actions, reduction="none")
    weights = continues.float()
    return (per_transition * weights).sum() / weights.sum().clamp_min(1.0)


@torch.no_grad()
def action_accuracy(logits: torch.Tensor, actions: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
    """Share of the within-episode transitions whose action the head ranks first (nan when there are none)."""
    kept = continues.bool()
    return (logits.argmax(1)[kept] == actions[kept]).float().mean()
