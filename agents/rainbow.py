"""Rainbow (Hessel et al. 2018) with the mixreg paper's Procgen settings.

C51 distributional Q-learning over a fixed support z_1..z_51, with
  - a dueling head:            q(s, a) = V(s) + A(s, a) - mean_a A(s, a)   (per atom, then softmax)
  - noisy layers as anyrl's noisy_net_dense (anyrl/models/dqn_scalar.py), sigma0 0.5, in both heads and in
                               the backbone's final 256-unit dense layer:
                               W = mu_W + sigma_W * (f(eps_out) f(eps_in)^T),  f(x) = sgn(x) sqrt|x|  (factorised)
                               b = mu_b + sigma_b * eps_b,  eps_b ~ N(0, 1) of its own                (not f(eps_out))
                               init: mu_W ~ truncated normal (std 1/sqrt(fan_in), cut at 2 std), mu_b = 0,
                               sigma_W, sigma_b ~ truncated normal (std sigma0/sqrt(fan_in), cut at 2 std)
                               fresh noise for every network pass, as TF draws it at every run: the online
                               next-state pass, the target pass and the online prediction each have their own
  - double-Q:                  a* = argmax_a E_z[p_online(s', a)],  target p_target(s', a*)
  - 3-step returns:            T z_j = G_t^(n) + gamma^n z_j, projected onto the support
  - the loss:                  w_i * KL_i,  KL_i = KL(projected target || p_online(s, a)),  w_i the IS weight
  - prioritised replay:        p_i = (w_i KL_i + 0.1)^0.5 (the importance-weighted loss, as anyrl's DQN feeds its
                               replay), IS exponent 0.4 (constant), weights over the largest possible
  - a target network copied every 8192 env steps, updates once per 64 env steps after 20k warm-up steps.
These are the mixreg paper's settings (its code builds Rainbow on the anyrl library).

With mixreg, each replay batch is mixed (agents.mixreg.mix_rainbow_batch) before the loss; see Rainbow.loss.

With `aux="inverse-dynamics"` (PAD, agents.inverse_dynamics) the online network carries an inverse-dynamics
head g on its encoder (the trunk's features, noisy layer included, as the prediction pass drew it), and every
update adds aux_weight * L_inv on the replay batch's one-step transitions: s_t, a_t and the frame s_{t+1} that
the replay stores one row on (the n-step target's frame s_{t+n} is no one-step successor), left out where
the episode ended with a_t. L_inv is taken on the clean replay frames, never on mixreg's mixtures (a mix of
frames is no transition any action led through; PAD's loss is on real transitions).

Distributed (torchrun): each worker steps its own envs into its own replay, as the paper's code ran
its workers, and samples its own batch; every gradient step averages the workers' gradients, so the
effective batch is batch_size x workers. Update and target-copy periods count each worker's own
env steps (so the replay ratio is the single process's); the warm-up, env_steps and the IS schedule
count the steps of all workers together, so N workers start learning after as many transitions as
one process would. With save_replay every worker checkpoints its own replay (agents.train).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs.procgen import SCORE_RANGES
from workbench.backbones import create_backbone
from workbench.runtime import Runtime, available_memory_bytes

from .inverse_dynamics import (AUX_TASKS, AUX_WEIGHT, INVERSE_DYNAMICS, InverseDynamicsHead, action_accuracy,
                               cropped_transitions, inverse_dynamics_loss)
from .mixreg import DEFAULT_ALPHA as DEFAULT_MIX_ALPHA, MIXREG_TARGETS, mix_rainbow_batch
from .regularizers import l2_penalty
from .replay import PrioritizedReplay, to_torch

# The mixreg paper's C51 supports; other games use [min(0, R_min), R_max] of the hard-mode score range.
SUPPORTS = {"starpilot": (0.0, 35.0), "caveflyer": (0.0, 13.4), "dodgeball": (0.0, 19.0),
            "fruitbot": (-5.0, 27.2), "jumper": (0.0, 10.0), "climber": (0.0, 12.6)}


def support_for(game: str) -> tuple[float, float]:
    if game in SUPPORTS:
        return SUPPORTS[game]
    r_min, r_max = SCORE_RANGES["hard"][game]
    return float(min(0.0, r_min)), float(r_max)


@dataclass
class RainbowConfig:
    num_envs: int = 64
    buffer_size: int = 500_000
    batch_size: int = 512
    n_step: int = 3
    gamma: float = 0.99
    learning_rate: float = 2.5e-4
    adam_eps: float = 1.5e-4
    num_atoms: int = 51
    v_min: float | None = None  # default: the game's support (SUPPORTS)
    v_max: float | None = None
    noisy_sigma0: float = 0.5
    noisy_trunk: bool = True        # the backbone's final dense layer is noisy too, as in the paper's network
    noise_per_pass: bool = True     # fresh noise for each network pass of an update, as anyrl (TF) draws it;
                                    # False: one draw per update, shared by the online passes
    priority_alpha: float = 0.5
    priority_eps: float = 0.1       # added to the KL loss before the exponent
    priority_beta: float = 0.4      # importance-sampling exponent, constant in the paper's anyrl code
    priority_beta_anneal: bool = False  # anneal beta to 1 over total_steps instead (Schaul et al., Hessel et al.)
    update_every: int = 64        # env steps per gradient update
    target_update: int = 8192     # env steps between target-network copies
    warmup_steps: int = 20_000
    steps_per_iteration: int = 64  # vector steps between logging points
    max_grad_norm: float = 10.0
    backbone: str = "impala_1x"
    backbone_kwargs: dict = field(default_factory=dict)
    mixreg: bool = False
    mix_alpha: float = DEFAULT_MIX_ALPHA
    mixreg_targets: str = "paper"  # or "projected": how mixreg mixes the targets, see Rainbow.loss
    total_steps: int = 25_000_000  # horizon of the optional importance-sampling anneal; set by the trainer
    save_replay: bool = False
    l2_coef: float = 0.0
    aux: str = "none"  # "inverse-dynamics": PAD's head beside the Q heads on the shared encoder
    aux_weight: float = AUX_WEIGHT  # weight of the inverse-dynamics loss (PAD's: 1)
    aux_crop: bool = False  # the head learns on random crops, as PAD's (train_procgen.py --aux turns it on)

    def __post_init__(self):
        if self.mixreg_targets not in MIXREG_TARGETS:
            raise ValueError(f"mixreg_targets must be one of {MIXREG_TARGETS}, not {self.mixreg_targets!r}")
        if self.aux not in AUX_TASKS:
            raise ValueError(f"unknown auxiliary task {self.aux!r}: choose from {', '.join(AUX_TASKS)}")


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """TF's truncated_normal_initializer(stddev=std): a normal of std `std` redrawn beyond 2 std (its own std
    is then about 0.88 std; TF 1 does not widen it)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class NoisyLinear(nn.Module):
    """Noisy linear layer (Fortunato et al. 2018) as anyrl's noisy_net_dense, which the paper's code uses.

    Weight noise is factorised, f(eps_out) f(eps_in)^T with f(x) = sgn(x) sqrt|x|; bias noise is a standard
    normal vector of its own (eps_b, not f(eps_out)). Initialisation: mu_W truncated normal with std
    1/sqrt(fan_in), mu_b zero, sigma_W and sigma_b truncated normal with std sigma0/sqrt(fan_in) (drawn,
    not a constant: a few start negative, which the noise's symmetry makes harmless).
    """

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        std = 1 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(truncated_normal_(torch.empty(out_features, in_features), std))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.weight_sigma = nn.Parameter(truncated_normal_(torch.empty(out_features, in_features), sigma0 * std))
        self.bias_sigma = nn.Parameter(truncated_normal_(torch.empty(out_features), sigma0 * std))
        self.register_buffer("eps_in", torch.zeros(in_features))
        self.register_buffer("eps_out", torch.zeros(out_features))
        self.register_buffer("eps_bias", torch.zeros(out_features))
        self.reset_noise()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the bias had noise of its own keeps this layer's current draw
        state_dict.setdefault(prefix + "eps_bias", self.eps_bias.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _scaled(n: int, device) -> torch.Tensor:
        x = torch.randn(n, device=device)
        return x.sign() * x.abs().sqrt()

    @torch.no_grad()
    def reset_noise(self) -> None:
        self.eps_in.copy_(self._scaled(self.in_features, self.eps_in.device))
        self.eps_out.copy_(self._scaled(self.out_features, self.eps_out.device))
        self.eps_bias.normal_()

    def forward(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        if not noise:  # the mean network
            return F.linear(x, self.weight_mu, self.bias_mu)
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.eps_out, self.eps_in)
        bias = self.bias_mu + self.bias_sigma * self.eps_bias
        return F.linear(x, weight, bias)


class RainbowNet(nn.Module):
    """Backbone + dueling noisy C51 head; returns log-probabilities (N, A, atoms).

    With `noisy_trunk` the backbone's final dense layer (IMPALA's 256-unit `fc`) becomes a NoisyLinear,
    as in the paper's anyrl network; `noise=False` runs every noisy layer as its mean (the mean network).
    With `inverse_dynamics`, PAD's inverse-dynamics head on the encoder (`inverse_dynamics`, else None).
    """

    def __init__(self, backbone: nn.Module, num_actions: int, num_atoms: int, sigma0: float,
                 noisy_trunk: bool = True, inverse_dynamics: bool = False):
        super().__init__()
        self.backbone, self.num_actions, self.num_atoms = backbone, num_actions, num_atoms
        self.noisy_trunk = noisy_trunk and isinstance(getattr(backbone, "fc", None), nn.Linear) \
            and hasattr(backbone, "flat_features")
        if noisy_trunk and not self.noisy_trunk:
            warnings.warn(f"{type(backbone).__name__} has no final dense layer to make noisy: only the heads are")
        if self.noisy_trunk:
            backbone.fc = NoisyLinear(backbone.fc.in_features, backbone.fc.out_features, sigma0)
        self.value = NoisyLinear(backbone.out_dim, num_atoms, sigma0)
        self.advantage = NoisyLinear(backbone.out_dim, num_actions * num_atoms, sigma0)
        self.inverse_dynamics = InverseDynamicsHead(backbone.out_dim, num_actions) if inverse_dynamics else None

    def features(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        if self.noisy_trunk:
            return F.relu(self.backbone.fc(self.backbone.flat_features(x), noise))
        return self.backbone(x)

    def encode(self, obs: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """phi(s): the encoder's features (fp32) of (N, H, W, C) frames in pixel units."""
        return self.features(obs.permute(0, 3, 1, 2).float() * (1.0 / 255.0), noise).float()

    def forward(self, obs: torch.Tensor, noise: bool = True) -> torch.Tensor:
        features = self.encode(obs, noise)
        with torch.autocast(device_type=features.device.type, enabled=False):
            value = self.value(features, noise).view(-1, 1, self.num_atoms)
            advantage = self.advantage(features, noise).view(-1, self.num_actions, self.num_atoms)
            return F.log_softmax(value + advantage - advantage.mean(1, keepdim=True), dim=2)

    def reset_noise(self) -> None:
        for module in self.modules():
            if isinstance(module, NoisyLinear):
                module.reset_noise()


def project_distribution(next_probs: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor,
                         support: torch.Tensor) -> torch.Tensor:
    """Categorical projection of T z = G + discount * z onto the support (Bellemare et al. 2017).

    next_probs (B, atoms), returns (B,), discounts (B,) -> target probabilities (B, atoms).
    """
    v_min, v_max = support[0].item(), support[-1].item()
    delta = (v_max - v_min) / (len(support) - 1)
    tz = (returns[:, None] + discounts[:, None] * support[None]).clamp(v_min, v_max)
    # clamp the position as well: in float32, (v_max - v_min) / delta can round to just above the last atom
    b = ((tz - v_min) / delta).clamp(0, len(support) - 1)
    lower, upper = b.floor().long(), b.ceil().long()
    # when b lands exactly on an atom, lower == upper: give it all the mass
    lower_weight = (upper.float() - b) + (lower == upper).float()
    upper_weight = b - lower.float()
    target = torch.zeros_like(next_probs)
    target.scatter_add_(1, lower, next_probs * lower_weight)
    target.scatter_add_(1, upper, next_probs * upper_weight)
    return target


class Rainbow:
    kind = "rainbow"
    # State that differs between torchrun workers: each keeps its own replay and sampling generator; the replay
    # (GiBs) is written by its own worker rather than gathered onto rank 0.
    RANK_LOCAL_STATE = ("replay", "rng")
    RANK_SHARD_STATE = ("replay",)

    def __init__(self, env, cfg: RainbowConfig, runtime: Runtime, with_replay: bool = True):
        self.env, self.cfg, self.rt = env, cfg, runtime
        v_min, v_max = cfg.v_min, cfg.v_max
        if v_min is None or v_max is None:  # the game's support fills whichever end was not given
            game_min, game_max = support_for(env.env_name)
            v_min, v_max = game_min if v_min is None else v_min, game_max if v_max is None else v_max
        self.support = torch.linspace(v_min, v_max, cfg.num_atoms, device=runtime.device)
        self.online = runtime.prepare_module(self._build_net(env))
        self.target = runtime.prepare_module(self._build_net(env))
        runtime.dist.broadcast_module(self.online)  # every worker starts from rank 0's initialisation
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.forward = runtime.maybe_compile(self.online)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        self.replay = self._make_replay(env) if with_replay else None
        self.rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
        self.env_steps = self.iterations = self.updates = 0
        self._obs: np.ndarray | None = None
        self._since_update = self._since_target = 0

    @classmethod
    def for_evaluation(cls, env, cfg: RainbowConfig, runtime: Runtime) -> "Rainbow":
        """An agent that only acts: no replay, so the training run's buffer size needs no memory here."""
        return cls(env, cfg, runtime, with_replay=False)

    def _build_net(self, env) -> RainbowNet:
        backbone = create_backbone(self.cfg.backbone, **self.cfg.backbone_kwargs)
        # the target network carries the head too (unused) so that it copies the online one's state as it is
        return RainbowNet(backbone, env.num_actions, self.cfg.num_atoms, self.cfg.noisy_sigma0, self.cfg.noisy_trunk,
                          inverse_dynamics=self.cfg.aux == INVERSE_DYNAMICS)

    def _make_replay(self, env) -> PrioritizedReplay:
        need = PrioritizedReplay.bytes_needed(self.cfg.buffer_size, env.observation_shape)
        free = available_memory_bytes()
        print(f"replay: {self.cfg.buffer_size:,} transitions of uint8 frames need {need / 2**30:.2f} GiB "
              f"({free / 2**30:.1f} GiB available)")
        if need > 0.9 * free:
            raise MemoryError(f"a replay of {self.cfg.buffer_size:,} transitions needs {need / 2**30:.1f} GiB but only "
                              f"{free / 2**30:.1f} GiB is available: lower --buffer-size")
        return PrioritizedReplay(self.cfg.buffer_size, env.num_envs, env.observation_shape, self.cfg.n_step,
                                 self.cfg.gamma, self.cfg.priority_alpha, self.cfg.priority_eps)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---------------------------------------------------------------- acting
    def expected_q(self, log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs.exp() * self.support).sum(-1)

    @torch.inference_mode()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Greedy in the expected return of the noisy network, with fresh noise at every call
        (exploration comes from the noise), or of the mean network when `deterministic`."""
        if not deterministic:
            self.online.reset_noise()
        with self.rt.autocast():
            log_probs = self.forward(obs, noise=not deterministic)
        return self.expected_q(log_probs).argmax(1)

    # ---------------------------------------------------------------- learning
    def importance_beta(self) -> float:
        if not self.cfg.priority_beta_anneal:
            return self.cfg.priority_beta
        frac = min(1.0, self.env_steps / max(1, self.cfg.total_steps))
        return self.cfg.priority_beta + frac * (1.0 - self.cfg.priority_beta)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample KL divergence from the projected target to the online distribution (mixreg optional).

        KL = cross-entropy - H(target): the cross-entropy's gradient, and (times the importance weight) the
        paper's priority (0 for a perfect fit). Returns (loss per sample, importance weights, replay index),
        all in the order of the samples the loss was computed on: with mixreg, the dominant samples'.
        With `cfg.noise_per_pass` each of the three network passes draws its own noise.

        mixreg mixes the targets as `cfg.mixreg_targets` says:
          "paper"      as the paper's code does: mix the target network's next-state distributions of every
                       action and the n-step returns, then project once at the dominant sample's double-Q
                       action with its discount. A terminal sample's next-state distribution is uniform
                       (anyrl's placeholder), so a terminal partner mixes (1 - lam) of a uniform distribution
                       into what the dominant's discount carries forward, and its return into the returns.
          "projected"  project each sample's own target (its action, return, discount) and mix the projected
                       distributions: a convex combination of two Bellman targets; a terminal partner
                       contributes its return alone.
        """
        cfg = self.cfg
        with torch.no_grad():
            with self.rt.autocast():
                self._fresh_noise(self.online)
                next_online = self.online(batch["next_obs"])
                self._fresh_noise(self.target)
                next_target = self.target(batch["next_obs"])
            batch["next_actions"] = self.expected_q(next_online.float()).argmax(1)
            next_dists = next_target.float().exp()
            next_dists[batch["discounts"] == 0] = 1.0 / cfg.num_atoms  # the episode ended within the n steps
            batch["next_dists"] = next_dists
        if cfg.mixreg:
            if cfg.mixreg_targets == "projected":
                batch["target"] = self.projected_target(batch)
            batch, _ = mix_rainbow_batch(batch, cfg.mix_alpha, cfg.mixreg_targets)
        target = batch["target"] if "target" in batch else self.projected_target(batch)
        self._fresh_noise(self.online)
        with self.rt.autocast():
            log_probs = self.forward(batch["obs"])
        chosen = log_probs.float()[torch.arange(len(target)), batch["actions"]]
        per_sample = (torch.xlogy(target, target) - target * chosen).sum(1)
        return per_sample, batch["weights"], batch["index"]

    def _fresh_noise(self, net: RainbowNet) -> None:
        if self.cfg.noise_per_pass:
            net.reset_noise()

    @torch.no_grad()
    def projected_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Phi(G + discount * z) of the target network's next-state distribution at the double-Q action."""
        next_probs = batch["next_dists"][torch.arange(len(batch["next_actions"])), batch["next_actions"]]
        return project_distribution(next_probs, batch["returns"], batch["discounts"], self.support)

    def _inverse_dynamics(self, transitions: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_inv, action accuracy) on the replay batch's clean one-step transitions, through the online
        network as its prediction pass drew the noise."""
        frames, next_frames = transitions["obs"], transitions["one_step_obs"]
        if self.cfg.aux_crop:
            frames, next_frames = cropped_transitions(frames, next_frames)
        with self.rt.autocast():
            features = self.online.encode(frames)
            next_features = self.online.encode(next_frames)
        logits = self.online.inverse_dynamics(features, next_features)
        actions, continues = transitions["actions"], transitions["one_step_continues"]
        return inverse_dynamics_loss(logits, actions, continues), action_accuracy(logits, actions, continues)

    def update(self) -> dict[str, float]:
        aux = self.online.inverse_dynamics is not None
        sample = self.replay.sample(self.cfg.batch_size, self.importance_beta(), self.rng, one_step=aux)
        batch = to_torch(sample, self.rt.device)
        # the real transitions, kept aside before the loss mixes the batch
        transitions = {k: batch.pop(k) if k.startswith("one_step") else batch[k]
                       for k in ("obs", "actions", "one_step_obs", "one_step_continues")} if aux else None
        per_sample, weights, index = self.loss(batch)
        weighted = weights * per_sample
        loss = weighted.mean()
        extra = {}
        if aux:
            inverse_dynamics, accuracy = self._inverse_dynamics(transitions)
            loss = loss + self.cfg.aux_weight * inverse_dynamics
            extra = {"inverse_dynamics": inverse_dynamics.item(), "inverse_dynamics_accuracy": accuracy.item()}
        if self.cfg.l2_coef > 0:
            loss = loss + self.cfg.l2_coef * l2_penalty(self.online)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.rt.dist.average_gradients(self.online.parameters())
        grad_norm = nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        # anyrl's DQN.train feeds the replay the importance-weighted losses (its `losses` = weights * KL)
        self.replay.update_priorities(index.cpu().numpy(), weighted.detach().cpu().numpy())
        self.online.reset_noise()
        self.target.reset_noise()
        self.updates += 1
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "importance_beta": self.importance_beta(),
                **extra}

    def train_iteration(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
        cfg, n = self.cfg, self.env.num_envs
        if self._obs is None:
            self.env.reset()
            self._obs = self.env.last_frames.copy()
        totals, count, steps_done = {}, 0, 0
        for _ in range(cfg.steps_per_iteration):
            if should_stop():
                break
            actions = self.act(self.env.as_tensor(self._obs)).cpu().numpy()
            next_obs, rewards, dones = self.env.step_numpy(actions)
            self.replay.add(self._obs, actions, rewards, dones)
            self._obs = next_obs.copy()
            self.env_steps += n * self.rt.dist.world_size
            steps_done += n
            self._since_update += n
            self._since_target += n
            if len(self.replay) * self.rt.dist.world_size < cfg.warmup_steps:  # the workers' replays together;
                # also after a resume without a saved replay
                self._since_update = 0
                continue
            while self._since_update >= cfg.update_every:
                self._since_update -= cfg.update_every
                for k, v in self.update().items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
            if self._since_target >= cfg.target_update:
                self._since_target = 0
                self.target.load_state_dict(self.online.state_dict())
        if steps_done == 0:
            return None
        self.iterations += 1
        metrics = self.rt.dist.mean({k: v / count for k, v in totals.items()})  # every worker's updates
        metrics.update(updates=float(self.updates), replay_size=float(len(self.replay)))
        return metrics

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {"online": self.online.state_dict(), "target": self.target.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "env_steps": self.env_steps,
                 "iterations": self.iterations, "updates": self.updates, "config": asdict(self.cfg),
                 "counters": (self._since_update, self._since_target), "rng": self.rng.bit_generator.state}
        if self.cfg.save_replay:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.online.noisy_trunk and "backbone.fc.weight" in state["online"]:
            state = self._with_noisy_trunk(state)
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.env_steps, self.iterations, self.updates = state["env_steps"], state["iterations"], state["updates"]
        self._since_update, self._since_target = state["counters"]
        self.rng.bit_generator.state = state["rng"]
        if "replay" in state and self.replay is not None:
            self.replay.load_state_dict(state["replay"])

    def _with_noisy_trunk(self, state: dict) -> dict:
        """A checkpoint from before the trunk's dense layer was noisy: its weights become the layer's mean
        and its sigma 0 (the same function), and Adam keeps its moments for every parameter it had."""
        def noisy(net: dict) -> dict:
            net = dict(net)
            weight, bias = net.pop("backbone.fc.weight"), net.pop("backbone.fc.bias")
            return net | {"backbone.fc.weight_mu": weight, "backbone.fc.bias_mu": bias,
                          "backbone.fc.weight_sigma": torch.zeros_like(weight),
                          "backbone.fc.bias_sigma": torch.zeros_like(bias),
                          "backbone.fc.eps_in": torch.zeros(weight.shape[1]),
                          "backbone.fc.eps_out": torch.zeros(weight.shape[0]),
                          "backbone.fc.eps_bias": torch.zeros(weight.shape[0])}

        def old_name(name: str) -> str | None:  # None: a sigma the plain layer did not have
            if not name.startswith("backbone.fc."):
                return name
            return name.removesuffix("_mu") if name.endswith("_mu") else None

        was = [old_name(name) for name, _ in self.online.named_parameters()]
        position = {name: i for i, name in enumerate(name for name in was if name is not None)}
        optimizer = state["optimizer"]
        moments = {i: optimizer["state"][position[name]] for i, name in enumerate(was)
                   if name is not None and position[name] in optimizer["state"]}
        groups = [dict(optimizer["param_groups"][0], params=list(range(len(was))))]
        return dict(state, online=noisy(state["online"]), target=noisy(state["target"]),
                    optimizer={"state": moments, "param_groups": groups})
