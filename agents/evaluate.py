"""Evaluation of a Procgen agent on unseen levels (the full level distribution)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from envs.procgen import PROTOCOLS, ProcgenVecEnv, visual_options
from workbench.checkpoint import load_checkpoint, resolve_checkpoint_path
from workbench.runtime import Runtime

from .algorithms import ALGORITHMS
from .regularizers import running_stats_frozen


def evaluate(agent, env: ProcgenVecEnv, num_episodes: int, deterministic: bool = False,
             record_video: bool = False, max_video_frames: int = 400, max_steps: int = 100_000,
             clean_frames: bool = False, seed: int = 0) -> dict:
    """Run `agent.act` until `num_episodes` episodes have finished; return their statistics.

    Each env contributes its first ceil(num_episodes / num_envs) episodes, so that
    short episodes are not over-represented. With `record_video`, env 0's frames
    are kept (up to `max_video_frames`) as a (T, H, W, 3) uint8 array. The agent's
    networks' batch-norm running statistics are left as training made them.

    Frames: as the paper's test workers. An agent trained with network randomisation plays through
    random kernels (its `test_augmentation`: a new kernel shared by all envs every rollout length, clean
    stretches with the training probability), drawn from a generator seeded with `seed`, unless
    `clean_frames`; every other agent sees clean frames (no training augmentation).

    The policy's own sampling (PPO's actions, Rainbow's noise) draws from torch's global generator seeded
    with `seed` inside a forked RNG state: two evaluations of one checkpoint play the same episodes, and the
    caller's random stream (training's, when it evaluates mid-run) is left as it was.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        return _play(agent, env, num_episodes, deterministic, record_video, max_video_frames, max_steps,
                     clean_frames, seed)


def _play(agent, env: ProcgenVecEnv, num_episodes: int, deterministic: bool, record_video: bool,
          max_video_frames: int, max_steps: int, clean_frames: bool, seed: int) -> dict:
    per_env = math.ceil(num_episodes / env.num_envs)
    returns = [[] for _ in range(env.num_envs)]
    running = np.zeros(env.num_envs)
    frames = []
    obs = env.reset()
    networks = [value for value in vars(agent).values() if isinstance(value, nn.Module)]
    test_view = None if clean_frames else getattr(agent, "test_augmentation", lambda: None)()
    generator = torch.Generator().manual_seed(seed)
    for step in range(max_steps):
        if record_video and len(returns[0]) == 0 and len(frames) < max_video_frames:
            frames.append(env.last_frames[0].copy())
        if test_view is not None:
            augmentation, period = test_view
            if step % period == 0:
                augmentation.resample(env.num_envs, obs.device, generator)
            obs = augmentation(obs)
        with running_stats_frozen(*networks):
            actions = agent.act(obs, deterministic=deterministic)
        _, rewards, dones = env.step_numpy(actions.cpu().numpy())
        obs = env.as_tensor(env.last_frames)
        running += rewards
        for i in np.flatnonzero(dones):
            if len(returns[i]) < per_env:
                returns[i].append(float(running[i]))
            running[i] = 0.0
        if all(len(r) >= per_env for r in returns):
            break
    else:
        raise RuntimeError(f"evaluation did not finish {num_episodes} episodes within {max_steps} steps")
    episode_returns = [r for env_returns in zip(*returns) for r in env_returns][:num_episodes]
    mean = float(np.mean(episode_returns))
    n = len(episode_returns)
    result = {"episodes": n, "mean_return": mean, "std_return": float(np.std(episode_returns)),
              "stderr_return": float(np.std(episode_returns, ddof=1) / math.sqrt(n)) if n > 1 else None,
              "normalized_score": env.normalized_score(mean), "env": env.env_name,
              "distribution_mode": env.distribution_mode, "num_levels": env.num_levels,
              "start_level": env.start_level, "deterministic": deterministic, "clean_frames": test_view is None,
              "returns": episode_returns}
    if record_video:
        result["video"] = np.stack(frames) if frames else np.zeros((0, 64, 64, 3), np.uint8)
    return result


# The two sets of episodes an agent is scored on. TEST: the full level distribution with env seed 12345, the
# episodes the tables report. VALIDATION: levels [10000, 10000 + n) with env seed 777, which neither training
# (levels [0, num_levels) of the protocol) nor the test episodes use: where pairs, methods and variants are chosen.
TEST_SEED = 12345
VALIDATION_START, VALIDATION_LEVELS, VALIDATION_SEED = 10_000, 500, 777
SPLITS = ("test", "val")


def split_levels(split: str, val_levels: int = VALIDATION_LEVELS) -> dict:
    """num_levels, start_level and seed (evaluate_checkpoint's arguments) of the test or the validation episodes."""
    if split == "val":
        return {"num_levels": val_levels, "start_level": VALIDATION_START, "seed": VALIDATION_SEED}
    if split == "test":
        return {"num_levels": 0, "start_level": 0, "seed": TEST_SEED}
    raise ValueError(f"unknown evaluation split {split!r}: choose {' or '.join(SPLITS)}")


RANDOM_POLICY = "random:"  # evaluate_procgen.py random:<game>: the uniform policy instead of a checkpoint


class UniformRandomPolicy:
    """Every action equally likely at every step: the floor a trained agent's return is read against
    (Procgen's R_min constants are not a random agent's return: coinrun's is 5, uniform play scores 3.2)."""

    def __init__(self, num_actions: int, seed: int):
        self.num_actions = num_actions
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return torch.randint(self.num_actions, (obs.shape[0],), generator=self.generator)


def evaluate_random_policy(game: str, episodes: int = 100, num_envs: int = 64, num_levels: int = 0,
                           start_level: int = 0, distribution_mode: str | None = None, visual=None,
                           seed: int = 12345, policy_seed: int = 0) -> dict:
    """The uniform random policy on `game` (easy unless told), with the same episodes as evaluate_checkpoint
    (levels and env randomness from `seed`; `policy_seed` draws the actions)."""
    env = ProcgenVecEnv(game, min(num_envs, episodes), distribution_mode or "easy", num_levels, start_level,
                        "cpu", seed=seed, **visual_options(visual or []))
    result = evaluate(UniformRandomPolicy(env.num_actions, policy_seed), env, episodes)
    result.update(policy="uniform random", visual=list(visual or []), seed=seed, policy_seed=policy_seed)
    return result


def evaluate_checkpoint(path, episodes: int = 100, num_envs: int = 64, num_levels: int = 0, start_level: int = 0,
                        distribution_mode: str | None = None, visual=None, deterministic: bool = False,
                        seed: int = 12345, device: str = "auto", clean_frames: bool = False) -> tuple[dict, Path]:
    """Load a training checkpoint and evaluate it; returns (result, default JSON path beside the checkpoint).
    `clean_frames`: a network-randomisation agent plays clean frames instead of random kernels (evaluate)."""
    ckpt_path = resolve_checkpoint_path(path)
    state = load_checkpoint(ckpt_path, kind="procgen-agent")
    config = state["config"]
    mode = distribution_mode or PROTOCOLS[config["protocol"]].distribution_mode
    runtime = Runtime.create(device, config.get("precision", "auto"))
    visual = list(config.get("visual", []) if visual is None else visual)
    env = ProcgenVecEnv(config["env"], min(num_envs, episodes), mode, num_levels, start_level, runtime.device,
                        seed=seed, **visual_options(visual))
    agent_cls, agent_cfg_cls = ALGORITHMS[config["algo"]]
    agent = agent_cls.for_evaluation(env, agent_cfg_cls(**config["agent"]), runtime)
    agent.load_state_dict(state["agent_state"])
    result = evaluate(agent, env, episodes, deterministic=deterministic, clean_frames=clean_frames, seed=seed)
    result.update(checkpoint=str(ckpt_path), algo=config["algo"], env_steps=agent.env_steps,
                  mixreg=bool(config["agent"].get("mixreg")), seed=seed, visual=visual)
    return result, ckpt_path.parent / "evaluation.json"
