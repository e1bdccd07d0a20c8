"""Proximal Policy Optimisation (Schulman et al. 2017) with the Procgen recipe (Cobbe et al. 2020).

One iteration = collect a rollout of `num_steps` x `num_envs` transitions, then
`num_epochs` passes of minibatch updates on

    L = L_clip + vf_coef * L_value - ent_coef * H[pi]
    L_clip  = E[ max(-A r, -A clip(r, 1 - eps, 1 + eps)) ],   r = pi(a|s) / pi_old(a|s)
    L_value = 1/2 E[ max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) ]

with advantages from GAE(gamma, lambda), normalised per minibatch (after
mixreg when it is on), and rewards scaled by a running std of the discounted
return (discounted by its own `reward_norm_gamma`, VecNormalize's 0.99 in the
baselines-based paper code, not GAE's 0.999). Defaults are the Procgen paper's.

The mixreg paper's augmentations (regularizers.py) act in the rollout: the
policy acts on the augmented frame, the buffer stores it and the update trains
on it unchanged. Random conv (network randomisation) stores the clean frame
instead, convolves it again in the update with the rollout's kernel, and adds
its feature-matching term

    L += fm_coef * MSE(phi(conv(s)), stop_gradient(phi(s)))    phi = the trunk's 256-d features

while the PPO terms use conv(s), or s in a clean rollout. With mixreg both
views are mixed, after the convolution, with the same weights and partners.
Evaluation plays a random-conv agent through random kernels as the paper's
test worker does (test_augmentation); the other augmentations test on clean frames.
With the batch-norm regulariser the network stays in training mode for
rollouts, updates and evaluation, as in the paper's code.

With `aux="inverse-dynamics"` (PAD, agents.inverse_dynamics) an inverse-dynamics head g beside the policy
reads the same encoder, and every minibatch adds

    L += aux_weight * L_inv,   L_inv = CE(g(phi(s_t), phi(s_{t+1})), a_t) over transitions within an episode

s_{t+1} is the rollout's next frame of the same env (after the last step, the frame that followed the
rollout); a transition whose episode ended (d_t) is left out. L_inv sees the frames the PPO loss sees
(augmented as the rollout was), but never mixreg's mixtures: a mix of two frames and a mix of their
successors are no transition any action led through, and PAD's loss is on real transitions.

Distributed (torchrun, workbench.distributed): every worker steps its own envs and keeps its
own rollout; each minibatch step averages the workers' gradients, and advantages are normalised
with moments summed over the workers, so N workers with minibatch m take exactly the step one
worker would take on the union of their N minibatches. The reward scaler's running moments are
updated with every worker's returns. Mixreg partners come from the worker's own minibatch, as in
the paper's MPI code (each worker mixes its own batch).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.backbones import create_backbone
from workbench.distributed import SINGLE, Distributed
from workbench.runtime import Runtime

from .inverse_dynamics import (AUX_TASKS, AUX_WEIGHT, INVERSE_DYNAMICS, InverseDynamicsHead, action_accuracy,
                               cropped_transitions, inverse_dynamics_loss)
from .mixreg import DEFAULT_ALPHA as DEFAULT_MIX_ALPHA, mix_ppo_minibatch
from .regularizers import (AUGMENTATIONS, CLEAN_ROLLOUT_PROB, FM_COEF, RandomConv, feature_matching_loss,
                           l2_penalty, running_stats_frozen)


@dataclass
class PPOConfig:
    num_envs: int = 64
    num_steps: int = 256
    gamma: float = 0.999
    gae_lambda: float = 0.95
    num_epochs: int = 3
    num_minibatches: int = 8
    learning_rate: float = 5e-4
    adam_eps: float = 1e-5
    clip_range: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    normalize_rewards: bool = True
    reward_norm_gamma: float = 0.99  # discount of the reward scaler's return (VecNormalize's default), not GAE's
    backbone: str = "impala_1x"
    backbone_kwargs: dict = field(default_factory=dict)
    mixreg: bool = False
    mix_alpha: float = DEFAULT_MIX_ALPHA
    augment: str | None = None  # one of regularizers.AUGMENTATIONS, applied in the rollout
    l2_coef: float = 0.0
    clean_rollout_prob: float = CLEAN_ROLLOUT_PROB  # random_conv: share of rollouts acted on and trained on clean
    fm_coef: float = FM_COEF  # random_conv: weight of the feature-matching loss
    aux: str = "none"  # "inverse-dynamics": PAD's head beside the policy on the shared encoder
    aux_weight: float = AUX_WEIGHT  # weight of the inverse-dynamics loss (PAD's: 1)
    aux_crop: bool = False  # the head learns on random crops, as PAD's (train_procgen.py --aux turns it on)

    def __post_init__(self):
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps ({self.num_envs * self.num_steps}) must be divisible by "
                             f"num_minibatches ({self.num_minibatches})")
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}: choose from {', '.join(AUGMENTATIONS)}")
        if self.aux not in AUX_TASKS:
            raise ValueError(f"unknown auxiliary task {self.aux!r}: choose from {', '.join(AUX_TASKS)}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


class ActorCritic(nn.Module):
    """Policy and value heads on a registry backbone; takes (N, H, W, C) images in pixel units. With
    `inverse_dynamics`, PAD's inverse-dynamics head on the same backbone (`inverse_dynamics`, else None); acting
    never reads it."""

    def __init__(self, backbone: nn.Module, num_actions: int, inverse_dynamics: bool = False):
        super().__init__()
        self.backbone = backbone
        self.policy_head = nn.Linear(backbone.out_dim, num_actions)
        self.value_head = nn.Linear(backbone.out_dim, 1)
        nn.init.orthogonal_(self.policy_head.weight, gain=0.01)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0)
        nn.init.zeros_(self.policy_head.bias)
        nn.init.zeros_(self.value_head.bias)
        self.inverse_dynamics = InverseDynamicsHead(backbone.out_dim, num_actions) if inverse_dynamics else None

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """phi(s): the backbone's features (fp32) of (N, H, W, C) frames in pixel units."""
        # NHWC -> NCHW is a free view that is channels_last in memory: no copy of the frames.
        return self.backbone(obs.permute(0, 3, 1, 2).float() * (1.0 / 255.0)).float()

    def forward(self, obs: torch.Tensor, with_features: bool = False):
        """(logits, values), and the backbone's features (fp32) as a third item `with_features`."""
        features = self.encode(obs)
        # Heads in fp32 even under autocast: log-prob ratios and values need the precision.
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits, values = self.policy_head(features), self.value_head(features).squeeze(-1)
        return (logits, values, features) if with_features else (logits, values)


class RunningMeanStd:
    """Parallel-update running moments (Chan et al.), on float64 numpy arrays."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        batch_mean, batch_var, n = x.mean(0), x.var(0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class RewardNormalizer:
    """Divide rewards by the running std of the discounted return, then clip (as VecNormalize).

    Under torchrun the moments are updated with the returns of every worker's envs (gathered), so
    all workers scale by the same std, the one a single process stepping all their envs would use."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8,
                 dist: Distributed = SINGLE):
        self.returns = np.zeros(num_envs, np.float64)
        self.rms = RunningMeanStd()
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.dist = dist

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        every_worker = self.dist.gather_cat(torch.from_numpy(self.returns)).numpy() if self.dist.enabled \
            else self.returns
        self.rms.update(every_worker)
        self.returns[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.rms.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"returns": self.returns, **self.rms.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.returns = state["returns"]
        self.rms.load_state_dict(state)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout.

    dones[t] = 1 when the episode ended with transition t (so s_{t+1} starts a new one):
        delta_t = r_t + gamma (1 - d_t) V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma lambda (1 - d_t) A_{t+1}
    Returns (advantages, returns = advantages + values).
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        nonterminal = 1.0 - dones[t].float()
        following = next_value if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * nonterminal * following - values[t]
        last = delta + gamma * gae_lambda * nonterminal * last
        advantages[t] = last
    return advantages, advantages + values


def normalize_advantages(advantages: torch.Tensor, dist: Distributed = SINGLE) -> torch.Tensor:
    """(A - mean) / (std + 1e-8) over the minibatch; under torchrun over the union of the workers'
    minibatches (sums of A and A^2 all-reduced; the sample std, as torch.std)."""
    if not dist.enabled:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    mean, var = dist.moments(advantages)
    return ((advantages.double() - mean) / (var.sqrt() + 1e-8)).to(advantages.dtype)


def ppo_loss(logits: torch.Tensor, values: torch.Tensor, batch: dict[str, torch.Tensor],
             cfg: PPOConfig, dist: Distributed = SINGLE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped PPO objective on one minibatch (mixed or not)."""
    advantages = normalize_advantages(batch["advantages"], dist)

    log_probs = F.log_softmax(logits, dim=-1)
    new_logprobs = log_probs.gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
    log_ratio = new_logprobs - batch["old_logprobs"]
    ratio = log_ratio.exp()
    policy_loss = torch.max(-advantages * ratio,
                            -advantages * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()

    old_values, returns = batch["old_values"], batch["returns"]
    values_clipped = old_values + (values - old_values).clamp(-cfg.clip_range, cfg.clip_range)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2).mean()

    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean(),
                 "clip_fraction": ((ratio - 1).abs() > cfg.clip_range).float().mean()}
    return loss, stats


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, dist: Distributed = SINGLE) -> float:
    """1 - Var[target - predicted] / Var[target]; under torchrun over the union of the workers' samples."""
    if not dist.enabled:
        var = target.var()
        return float("nan") if var == 0 else float(1 - (target - predicted).var() / var)
    var, residual_var = dist.moments(target)[1], dist.moments(target - predicted)[1]
    return float("nan") if var == 0 else float(1 - residual_var / var)


class PPO:
    """PPO agent bound to a vectorised env: `train_iteration()` collects one rollout and updates."""

    kind = "ppo"
    # State that differs between torchrun workers (each scales its own envs' returns); the rest is shared.
    RANK_LOCAL_STATE = ("reward_normalizer",)

    def __init__(self, env, cfg: PPOConfig, runtime: Runtime):
        self.env, self.cfg, self.rt = env, cfg, runtime
        backbone = create_backbone(cfg.backbone, **cfg.backbone_kwargs)
        self.model = runtime.prepare_module(ActorCritic(backbone, env.num_actions,
                                                        inverse_dynamics=cfg.aux == INVERSE_DYNAMICS))
        runtime.dist.broadcast_module(self.model)  # every worker starts from rank 0's initialisation
        self.forward = runtime.maybe_compile(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        self.reward_normalizer = (RewardNormalizer(cfg.num_envs, cfg.reward_norm_gamma, dist=runtime.dist)
                                  if cfg.normalize_rewards else None)
        if cfg.augment == "random_conv":
            self.augmentation = RandomConv(clean_rollout_prob=cfg.clean_rollout_prob)
        else:
            self.augmentation = AUGMENTATIONS[cfg.augment]() if cfg.augment is not None else None
        # Network randomisation keeps the clean frames in the buffer and re-applies the rollout's kernel in the
        # update, as the paper's code: its feature-matching target needs the clean frame.
        self.random_conv = self.augmentation if isinstance(self.augmentation, RandomConv) else None
        # The paper's batch-norm baseline never leaves training mode: rollout log-probs then come from the
        # same (batch-statistics) mode as the update's.
        self.batch_norm_always_training = bool(cfg.backbone_kwargs.get("batch_norm", False))
        self.env_steps = 0
        self.iterations = 0
        self._obs = None
        self.buffer: dict[str, torch.Tensor] | None = None  # allocated by the first rollout

    @classmethod
    def for_evaluation(cls, env, cfg: PPOConfig, runtime: Runtime) -> "PPO":
        return cls(env, cfg, runtime)  # nothing to leave out: the rollout buffer is allocated on first use

    def _allocate_buffer(self) -> dict[str, torch.Tensor]:
        dev, t, n = self.rt.device, self.cfg.num_steps, self.cfg.num_envs
        return {  # the frames acted on; random conv: the clean frames, convolved again in the update
            "obs": torch.zeros((t, n, *self.env.observation_shape), dtype=torch.uint8, device=dev),
            "actions": torch.zeros((t, n), dtype=torch.long, device=dev),
            "logprobs": torch.zeros((t, n), device=dev),
            "values": torch.zeros((t, n), device=dev),
            "rewards": torch.zeros((t, n), device=dev),
            "dones": torch.zeros((t, n), dtype=torch.bool, device=dev),
            "next_value": torch.zeros(n, device=dev),  # V of the frame after the rollout, for GAE's bootstrap
            # the frame after the rollout, stored as "obs" is: s_{t+1} of the last step, for the inverse dynamics
            "final_obs": torch.zeros((n, *self.env.observation_shape), dtype=torch.uint8, device=dev),
        }

    # ---------------------------------------------------------------- acting
    @contextmanager
    def _acting(self):
        """Eval mode for acting, except batch norm as a regulariser, which stays in training mode; either way
        acting writes no batch-norm running statistics (evaluation's test frames least of all)."""
        self.model.train(self.batch_norm_always_training)
        with torch.inference_mode(), self.rt.autocast(), running_stats_frozen(self.model):
            yield

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions on the frames given, as they are (evaluation passes them through `test_augmentation`)."""
        with self._acting():
            logits, _ = self.forward(obs)
        return logits.argmax(-1) if deterministic else torch.multinomial(logits.softmax(-1), 1).squeeze(1)

    def test_augmentation(self) -> tuple[RandomConv, int] | None:
        """What evaluation on unseen levels plays through, and how many steps each draw lasts: for network
        randomisation a RandomConv of its own (the rollout's kernel stays as it is) with a new kernel, or a
        clean stretch with clean_rollout_prob, every num_steps steps, as the paper's test worker runs the
        training runner (train_netrand.py); None for every other agent (cutout-color and random crop are
        left out on the paper's test worker)."""
        if self.random_conv is None:
            return None
        return RandomConv(clean_rollout_prob=self.cfg.clean_rollout_prob), self.cfg.num_steps

    def _policy_step(self, obs: torch.Tensor):
        with self._acting():
            logits, value = self.forward(obs)
            log_probs = F.log_softmax(logits, -1)
            action = torch.multinomial(log_probs.exp(), 1).squeeze(1)
            return action, log_probs.gather(1, action.unsqueeze(1)).squeeze(1), value

    def _value(self, obs: torch.Tensor) -> torch.Tensor:
        with self._acting():
            return self.forward(obs)[1]

    def _view(self, obs: torch.Tensor) -> torch.Tensor:
        """The frame the agent acts on and trains on: augmented with this rollout's parameters."""
        return obs if self.augmentation is None else self.augmentation(obs)

    def collect_rollout(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Fill the buffer with num_steps transitions; False if interrupted (the partial rollout is discarded)."""
        if self.buffer is None:
            self.buffer = self._allocate_buffer()
        buf = self.buffer
        if self._obs is None:
            self._obs = self.env.reset()
        if self.augmentation is not None:
            self.augmentation.resample(self.cfg.num_envs, self.rt.device)  # fixed for this rollout and its update
        for t in range(self.cfg.num_steps):
            if should_stop():
                return False
            obs = self._view(self._obs)
            action, logprob, value = self._policy_step(obs)
            buf["obs"][t].copy_(self._obs if self.random_conv is not None else obs)
            buf["actions"][t], buf["logprobs"][t], buf["values"][t] = action, logprob, value
            next_obs, rewards, dones = self.env.step_numpy(action.cpu().numpy())
            if self.reward_normalizer is not None:
                rewards = self.reward_normalizer(rewards, dones)
            buf["rewards"][t].copy_(torch.from_numpy(rewards))
            buf["dones"][t].copy_(torch.from_numpy(dones))
            self._obs = self.env.as_tensor(next_obs)
        final = self._view(self._obs)
        buf["next_value"].copy_(self._value(final))  # GAE's bootstrap: same view and mode
        buf["final_obs"].copy_(self._obs if self.random_conv is not None else final)
        self.env_steps += self.cfg.batch_size * self.rt.dist.world_size  # counted over every worker
        return True

    # ---------------------------------------------------------------- learning
    def _minibatch_loss(self, mb: dict[str, torch.Tensor]):
        cfg, conv = self.cfg, self.random_conv
        transitions = mb  # the real frames, before any mixing (the inverse dynamics' input)
        if conv is not None:  # the stored clean frames, convolved with the rollout's kernel as when acting
            clean, randomised = mb["obs"], conv.randomise(mb["obs"])
            mb = {**mb, "obs": clean if conv.clean else randomised}
        if cfg.mixreg:  # after augmentation; random conv's other view gets the same weights and partners
            mb, mix = mix_ppo_minibatch(mb, cfg.mix_alpha)
            if conv is not None:
                clean, randomised = mix.mix(clean), mix.mix(randomised)
        with self.rt.autocast():
            logits, values, features = self.forward(mb["obs"], with_features=True)
        loss, stats = ppo_loss(logits, values, mb, cfg, self.rt.dist)
        if conv is not None:
            fm = self._feature_matching(features, clean, randomised)
            loss = loss + cfg.fm_coef * fm
            stats["feature_matching"] = fm.detach()
        if self.model.inverse_dynamics is not None:
            aux, stats["inverse_dynamics_accuracy"] = self._inverse_dynamics(
                transitions, None if cfg.mixreg else features)
            loss = loss + cfg.aux_weight * aux
            stats["inverse_dynamics"] = aux.detach()
        if cfg.l2_coef > 0:
            loss = loss + cfg.l2_coef * l2_penalty(self.model)
        return loss, stats

    def _stored_view(self, frames: torch.Tensor) -> torch.Tensor:
        """What the PPO loss sees of stored frames: random conv's rollout kernel applied (unless the rollout is
        clean); every other buffer already holds the frames as acted on."""
        conv = self.random_conv
        return frames if conv is None or conv.clean else conv.randomise(frames)

    def _inverse_dynamics(self, mb: dict[str, torch.Tensor], features: torch.Tensor | None = None):
        """(L_inv, action accuracy) on the minibatch's transitions, in the PPO loss's view; `features`:
        phi(s_t) from the PPO forward where it ran on these very frames. The extra forwards leave the
        batch-norm running statistics to the PPO forward."""
        frames, next_frames = self._stored_view(mb["obs"]), self._stored_view(mb["next_obs"])
        if self.cfg.aux_crop:     # PAD's crops: phi(s_t) of the PPO forward is not of these frames
            (frames, next_frames), features = cropped_transitions(frames, next_frames), None
        with self.rt.autocast(), running_stats_frozen(self.model):
            if features is None:
                features = self.forward(frames, with_features=True)[2]
            next_features = self.forward(next_frames, with_features=True)[2]
        logits = self.model.inverse_dynamics(features, next_features)
        return (inverse_dynamics_loss(logits, mb["actions"], mb["continues"]),
                action_accuracy(logits, mb["actions"], mb["continues"]))

    def _next_frames(self, idx: torch.Tensor) -> torch.Tensor:
        """s_{t+1} of the flat rollout indices t * num_envs + env: the same env's frame one row on, or after the
        last row the frame that followed the rollout (a new episode's first where the episode ended)."""
        n, size = self.cfg.num_envs, self.cfg.batch_size
        following = idx + n
        frames = self.buffer["obs"].flatten(0, 1)[following.clamp(max=size - 1)]
        inside = (following < size).view(-1, *([1] * (frames.dim() - 1)))
        return torch.where(inside, frames, self.buffer["final_obs"][idx % n])

    def _feature_matching(self, features: torch.Tensor, clean: torch.Tensor, randomised: torch.Tensor):
        """MSE(phi(randomised), stop_gradient(phi(clean))), reusing the PPO forward's `features` for the view it
        saw; the other view's forward leaves the batch-norm running statistics to the PPO forward."""
        with self.rt.autocast(), running_stats_frozen(self.model):
            if self.random_conv.clean:  # PPO ran on clean frames: their features are the target
                return feature_matching_loss(self.forward(randomised, with_features=True)[2], features)
            with torch.no_grad():
                target = self.forward(clean, with_features=True)[2]
        return feature_matching_loss(features, target)

    def update(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, float]:
        cfg, buf = self.cfg, self.buffer
        with torch.inference_mode():
            advantages, returns = compute_gae(buf["rewards"], buf["values"], buf["dones"], buf["next_value"],
                                              cfg.gamma, cfg.gae_lambda)
        flat = {"obs": buf["obs"].flatten(0, 1), "actions": buf["actions"].flatten(),
                "old_logprobs": buf["logprobs"].flatten(), "old_values": buf["values"].flatten(),
                "advantages": advantages.flatten().clone(), "returns": returns.flatten().clone()}
        if self.model.inverse_dynamics is not None:
            flat["continues"] = ~buf["dones"].flatten()  # s_{t+1} belongs to s_t's episode
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        count = 0
        for _ in range(cfg.num_epochs):
            order = torch.randperm(cfg.batch_size, device=self.rt.device)
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                if should_stop():
                    break
                idx = order[start:start + cfg.minibatch_size]
                mb = {k: v[idx] for k, v in flat.items()}
                if self.model.inverse_dynamics is not None:
                    mb["next_obs"] = self._next_frames(idx)
                loss, stats = self._minibatch_loss(mb)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.rt.dist.average_gradients(self.model.parameters())
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = grad_norm.detach()
                for k, v in stats.items():  # summed as tensors: no device sync per minibatch
                    totals[k] = totals[k] + v if k in totals else v.float()
                count += 1
        self.iterations += 1
        # every worker's minibatches: the losses are means over ranks, the explained variance is the union's
        metrics = self.rt.dist.mean({k: float(v) / max(count, 1) for k, v in totals.items()})
        metrics["explained_variance"] = explained_variance(flat["old_values"], flat["returns"], self.rt.dist)
        return metrics

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_iteration(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
        """One rollout + update; None when interrupted before any update happened."""
        if not self.collect_rollout(should_stop):
            return None
        return self.update(should_stop)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "env_steps": self.env_steps, "iterations": self.iterations, "config": asdict(self.cfg),
                "reward_normalizer": None if self.reward_normalizer is None else self.reward_normalizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.env_steps, self.iterations = state["env_steps"], state["iterations"]
        if self.reward_normalizer is not None and state.get("reward_normalizer") is not None:
            self.reward_normalizer.load_state_dict(state["reward_normalizer"])
