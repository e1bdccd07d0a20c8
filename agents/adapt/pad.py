"""PAD: self-supervised policy adaptation during deployment (Hansen et al., ICLR 2021), for Procgen agents.

A source agent trained with `--aux inverse-dynamics` carries an inverse-dynamics head g beside its policy (or
Q heads) on the shared encoder phi (agents.inverse_dynamics). In the target visuals there is no reward; PAD
keeps training phi, and g, on the inverse-dynamics loss alone,

    min_{phi, g}  L_inv = mean_t CE(g(phi(s_t), phi(s_{t+1})), a_t)     over transitions within an episode

while the policy and value heads (Rainbow: its value and advantage heads) stay as trained: the policy
pi(phi(s)) changes only through phi. g is updated with phi, as the official update_inv steps both the
encoder's and the head's optimiser (src/agent/agent.py L496-501).

Two modes, both Adam at PAD's lr 1e-3 (encoder_lr and ss_lr, src/arguments.py L42, L49; default betas):
- offline (the default): `epochs` passes over collected target transitions (TargetFrames), minibatches of
  `batch_size` (128, PAD's training batch, arguments.py L19). Not in the official code, which adapts online
  only; this is its update run over frames gathered beforehand.
- online (`pad_online`, --online): PAD as its eval.py runs it. The agent plays the target evaluation
  episodes (the levels `evaluate_both_domains` plays the source agent on); every episode starts from a fresh
  copy of the source agent (eval.py L20, deepcopy per episode, so nothing carries over between episodes), and
  after every environment step the copy takes one gradient step (eval.py L56-64) on a batch of
  `pad_batch_size` (32, arguments.py L70) random crops of the transition just played (batch_from_obs and
  random_crop, eval.py L59-64). Each copy starts a fresh Adam, as the official one does: its checkpoints
  hold the networks' weights only (agent.py save/load), so the optimiser eval.py copies has never stepped.
  The mean return of those episodes is PAD's measure. Where an episode ends, the next frame is the next
  episode's first and there is no transition to learn from; the copy is replaced.

One choice of ours, the crop, where Procgen differs from DMControl. PAD renders 100x100 and crops 84x84 at
random (a translation by up to 16 px). Procgen renders 64x64 and the agent reads 64x64, so the crop is the
repository's Procgen crop (agents.regularizers.RandomCrop, the mixreg paper's: resize to 75x75, take a 64x64
window). PAD crops s_t and s_{t+1} independently; its frames are stacks of 3, whose motion survives any crop.
A Procgen frame is single, and a shift of up to 10 px between s_t and s_{t+1} would swamp a move of a few
pixels, so both frames of a copy share one window. PAD trains its head on crops as well, so the crops at
deployment are inputs the head learnt from; here both modes crop exactly when the source's head was trained
on crops (its config's `aux_crop`, on by default with --aux). A head trained on plain frames adapts on plain
frames: online, the transition itself instead of 32 crops of it (their loss would be 32 equal terms).

What adapts, as in PAD's code. PAD's inverse-dynamics encoder shares only the first conv layers with the
policy's (8 of 11) and has its own projection (fc + LayerNorm, agent.py's ss_encoder built beside the actor's
and tied by copy_conv_weights_from), so at deployment the policy's projection never moves. Here the head reads
the policy's whole encoder (agents.inverse_dynamics), so by default (`pad_keep_fc`) the encoder's dense layer
`backbone.fc`, the features the policy head reads (Rainbow: its noisy trunk layer), stays as trained and only
the conv trunk adapts; the gradient still passes through that layer to the convs. An encoder with no dense
layer (the ResNets) adapts whole. `--no-pad-keep-fc` adapts the whole encoder, fc included: this repository's
default until the validation levels chose the paper's split on two shifts (docs/RESULTS.md, issue 36).

The checkpoint written after online PAD holds the encoder and head as the last episode to end left them
(every episode starts again from the source, so no single adapted network exists).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from envs.procgen import ProcgenVecEnv, domain_name, visual_options
from workbench.checkpoint import CheckpointError
from workbench.logging import RunLogger

from ..evaluate import split_levels
from ..inverse_dynamics import action_accuracy, cropped_transitions, inverse_dynamics_loss
from ..rainbow import NoisyLinear
from ..regularizers import RandomCrop, running_stats_frozen
from .core import EVAL_ENVS, TargetFrames

SOURCE_ALGOS = ("ppo", "rainbow")  # PAD reads no policy head: Rainbow agents adapt too
MAX_ONLINE_STEPS = 100_000         # as agents.evaluate.evaluate: episodes that never end are an error


def check_source(adapter) -> None:
    """PAD needs the source agent's inverse-dynamics head: a one-line error naming the fix where it has none."""
    if getattr(adapter.model, "inverse_dynamics", None) is None:
        raise CheckpointError(f"{adapter.source_path} has no inverse-dynamics head, which PAD adapts with: train "
                              "the source with --aux inverse-dynamics")
    has_fc = dense_layer(adapter.model.backbone) is not None
    if adapter.cfg.pad_keep_fc is None:   # PAD's split where there is a dense layer to keep
        adapter.cfg.pad_keep_fc = has_fc
    elif adapter.cfg.pad_keep_fc and not has_fc:
        raise CheckpointError(f"--pad-keep-fc keeps the encoder's dense layer, and {adapter.source_path}'s "
                              f"{type(adapter.model.backbone).__name__} has none: use an IMPALA agent or leave it out")


def dense_layer(backbone: nn.Module) -> nn.Module | None:
    """The encoder's final dense layer, the features the policy or Q heads read (IMPALA's `fc`, a NoisyLinear in
    Rainbow's trunk); None for an encoder without one."""
    fc = getattr(backbone, "fc", None)
    return fc if isinstance(fc, (nn.Linear, NoisyLinear)) else None


def uses_target_frames(cfg) -> bool:
    """Online PAD plays its own episodes; offline PAD learns from collected transitions."""
    return not cfg.pad_online


def progress_total(adapter, frames: TargetFrames | None) -> int:
    if frames is None:
        return adapter.cfg.eval_episodes
    return adapter.cfg.epochs * math.ceil(int(frames.continues.sum()) / adapter.cfg.batch_size)


def trained_on_crops(adapter) -> bool:
    """Whether the source's inverse-dynamics head learnt on random crops (agents trained before `aux_crop`
    existed did not)."""
    return bool(adapter.source_state["config"]["agent"].get("aux_crop", False))


def trainable(net: nn.Module, keep_fc: bool = False) -> list[nn.Parameter]:
    """Freeze everything but the encoder and the inverse-dynamics head (with keep_fc, the encoder's dense layer
    too: the conv trunk alone adapts); returns the parameters left to train."""
    net.requires_grad_(False)
    net.backbone.requires_grad_(True)
    net.inverse_dynamics.requires_grad_(True)
    if keep_fc:
        dense_layer(net.backbone).requires_grad_(False)   # check_source made sure there is one
    return [p for p in net.parameters() if p.requires_grad]


def fresh_noise(net: nn.Module) -> None:
    """New noise for the encoder's noisy layer (Rainbow's trunk) before every pass, as Rainbow draws it; the
    Q heads' draws are left to acting. An actor-critic has none."""
    for module in net.backbone.modules():
        if hasattr(module, "reset_noise"):
            module.reset_noise()


def inverse_dynamics_logits(net: nn.Module, frames: torch.Tensor, next_frames: torch.Tensor) -> torch.Tensor:
    """g(phi(s_t), phi(s_{t+1})) of uint8 frames (N, 64, 64, 3)."""
    return net.inverse_dynamics(net.encode(frames), net.encode(next_frames))


def pad_step(net: nn.Module, optimizer: torch.optim.Optimizer, frames: torch.Tensor, actions: torch.Tensor,
             next_frames: torch.Tensor) -> float:
    """One Adam step on L_inv of within-episode transitions; returns the loss."""
    net.train()
    fresh_noise(net)
    logits = inverse_dynamics_logits(net, frames, next_frames)
    loss = inverse_dynamics_loss(logits, actions, torch.ones_like(actions, dtype=torch.bool))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def inverse_dynamics_scores(net: nn.Module, frames: TargetFrames, device, batch: int = 512) -> dict:
    """L_inv and the head's action accuracy on a set of transitions (eval mode)."""
    net.eval()
    logits = []
    for start in range(0, len(frames), batch):
        part = slice(start, start + batch)
        fresh_noise(net)
        logits.append(inverse_dynamics_logits(net, frames.frames[part].to(device),
                                              frames.next_frames[part].to(device)).cpu())
    logits = torch.cat(logits)
    return {"inverse_dynamics_loss": float(inverse_dynamics_loss(logits, frames.actions, frames.continues)),
            "inverse_dynamics_accuracy": float(action_accuracy(logits, frames.actions, frames.continues)),
            "transitions": int(frames.continues.sum())}


def adapt(adapter, frames: TargetFrames | None, logger: RunLogger) -> list[dict]:
    adapted = "the encoder's conv trunk (its dense layer kept)" if adapter.cfg.pad_keep_fc else "the whole encoder"
    print(f"PAD adapts {adapted} and the inverse-dynamics head", flush=True)
    if adapter.cfg.pad_online:
        return adapt_online(adapter, logger)
    return adapt_offline(adapter, frames, logger)


# ---------------------------------------------------------------- offline: epochs over collected transitions
def adapt_offline(adapter, frames: TargetFrames, logger: RunLogger) -> list[dict]:
    cfg, model, device = adapter.cfg, adapter.model, adapter.rt.device
    optimizer = torch.optim.Adam(trainable(model, cfg.pad_keep_fc), lr=cfg.lr)
    crop = RandomCrop() if trained_on_crops(adapter) else None
    progress = adapter.resume_point(optimizer)
    history = progress.history
    for epoch in range(progress.epochs, cfg.epochs):
        if epoch > 0 and cfg.recollect:
            frames = adapter.target_frames(epoch)
        stats = inverse_dynamics_scores(model, frames, device)   # before this epoch's steps
        within = frames.continues.nonzero().squeeze(1)
        losses = []
        for idx in within[torch.randperm(len(within))].split(cfg.batch_size):
            if len(idx) < 2:
                continue
            batch, next_batch = frames.frames[idx].to(device), frames.next_frames[idx].to(device)
            if crop is not None:
                batch, next_batch = cropped_transitions(batch, next_batch, crop)
            losses.append(pad_step(model, optimizer, batch, frames.actions[idx].to(device), next_batch))
            logger.advance(1)
        stats["train_loss"] = float(np.mean(losses)) if losses else None
        logger.scalars("target", stats, epoch)
        history.append(stats)
        adapter.epoch_finished(history, optimizer)
    return history


# ---------------------------------------------------------------- online: PAD's episodes
class EpisodeLearner:
    """One env's agent for one episode at a time: a fresh copy of the source network and a fresh Adam at
    every episode's start, one step on L_inv after every environment step."""

    def __init__(self, adapter):
        self.adapter, self.cfg = adapter, adapter.cfg
        self.net = copy.deepcopy(adapter.source_model())
        self.parameters = trainable(self.net, self.cfg.pad_keep_fc)
        self.crop = RandomCrop() if trained_on_crops(adapter) else None
        self.start_episode()

    def start_episode(self) -> None:
        self.net.load_state_dict(self.adapter.source_model().state_dict())
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.cfg.lr)
        self.losses: list[float] = []

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> int:
        """The agent's action on one frame (1, 64, 64, 3), as the source agent acts: PPO samples its policy,
        Rainbow is greedy in the expected return with fresh noise."""
        agent, net = self.adapter.agent, self.net
        net.train(getattr(agent, "batch_norm_always_training", False))   # PAD acts in eval mode (eval.py L40)
        with running_stats_frozen(net):
            if agent.kind == "rainbow":
                net.reset_noise()
                return int(agent.expected_q(net(obs)).argmax(1))
            return int(torch.multinomial(net(obs)[0].softmax(-1), 1))

    def learn(self, frame: torch.Tensor, action: int, next_frame: torch.Tensor) -> None:
        """PAD's batch: pad_batch_size copies of the transition, each randomly cropped (one window per copy,
        shared by s_t and s_{t+1}), all labelled with the action taken; the transition alone where the head
        was trained on plain frames."""
        frames, next_frames = frame.unsqueeze(0), next_frame.unsqueeze(0)
        if self.crop is not None:
            n = self.cfg.pad_batch_size
            frames, next_frames = cropped_transitions(frames.expand(n, *frame.shape),
                                                      next_frames.expand(n, *frame.shape), self.crop)
        actions = torch.full((len(frames),), action, dtype=torch.long, device=frame.device)
        self.losses.append(pad_step(self.net, self.optimizer, frames, actions, next_frames))


def adapt_online(adapter, logger: RunLogger) -> list[dict]:
    """Play the target evaluation episodes (each env its first ceil(episodes / envs), as agents.evaluate counts
    them) with PAD adapting a fresh copy of the agent during each; one dict with their returns."""
    cfg, device = adapter.cfg, adapter.rt.device
    env = ProcgenVecEnv(adapter.game, min(EVAL_ENVS, cfg.eval_episodes), adapter.mode, device=device,
                        **split_levels(cfg.eval_split), **visual_options(adapter.options))
    per_env = math.ceil(cfg.eval_episodes / env.num_envs)
    learners = [EpisodeLearner(adapter) for _ in range(env.num_envs)]
    returns, losses = [[] for _ in learners], [[] for _ in learners]
    running = np.zeros(env.num_envs)
    idle = np.random.default_rng(cfg.seed)   # actions for envs whose episodes are all played
    env.reset()
    for _ in range(MAX_ONLINE_STEPS):
        playing = [e for e in range(env.num_envs) if len(returns[e]) < per_env]
        if not playing:
            break
        obs = torch.from_numpy(env.last_frames.copy()).to(device)   # s_t, kept past the step
        actions = idle.integers(0, env.num_actions, env.num_envs)
        for e in playing:
            actions[e] = learners[e].act(obs[e:e + 1])
        next_obs, rewards, first = env.step_numpy(actions)
        next_obs, first = torch.from_numpy(next_obs.copy()).to(device), first.astype(bool)
        running += rewards
        for e in playing:
            if not first[e]:
                learners[e].learn(obs[e], int(actions[e]), next_obs[e])
                continue
            returns[e].append(float(running[e]))   # the episode ended with this step
            losses[e].append(float(np.mean(learners[e].losses)) if learners[e].losses else None)
            adapter.model.load_state_dict(learners[e].net.state_dict())   # the last episode to end, for the checkpoint
            learners[e].start_episode()
            logger.advance(1)
        running[first] = 0.0
    else:
        raise RuntimeError(f"online PAD did not finish {cfg.eval_episodes} episodes within {MAX_ONLINE_STEPS} steps")
    # episode k of every env before episode k + 1 of any, as agents.evaluate orders them
    episodes = [r for env_returns in zip(*returns) for r in env_returns][:cfg.eval_episodes]
    episode_losses = [v for env_losses in zip(*losses) for v in env_losses][:cfg.eval_episodes]
    result = {"online_returns": episodes, "online_mean_return": float(np.mean(episodes)),
              "online_stderr_return": float(np.std(episodes, ddof=1) / math.sqrt(len(episodes)))
              if len(episodes) > 1 else None,
              "episodes": len(episodes), "episode_inverse_dynamics_loss": episode_losses}
    se = result["online_stderr_return"]
    print(f"online PAD on the target domain ({domain_name(adapter.options)}): mean return "
          f"{result['online_mean_return']:.2f}" + (f" ± {se:.2f}" if se is not None else "") +
          f" over {len(episodes)} episodes, adapting during each", flush=True)
    logger.scalars("target", {"online_mean_return": result["online_mean_return"]}, 0)
    return [result]
