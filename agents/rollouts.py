"""Transitions played by an agent in one visual domain, kept every n-th step so that they span whole episodes:
what the adaptation methods learn from (agents.adapt) and what feature statistics are measured on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.procgen import ProcgenVecEnv, visual_options

# keep every 16th step of play: 8,192 frames of 64 envs span 2,048 steps, whole episodes of most games
FRAME_STRIDE = 16


@dataclass
class TargetFrames:
    """Transitions played in one domain: frames (N, 64, 64, 3) uint8, the action taken on each (N,), the
    frame that followed (N, 64, 64, 3) and whether it belongs to the same episode (N,) bool (Procgen
    resets a finished episode by itself, so the frame after the last step is the next episode's first)."""

    frames: torch.Tensor
    actions: torch.Tensor
    next_frames: torch.Tensor
    continues: torch.Tensor

    def __len__(self) -> int:
        return len(self.frames)

    def save(self, path: Path, **info) -> None:
        np.savez_compressed(path, frames=self.frames.numpy(), actions=self.actions.numpy(),
                            next_frames=self.next_frames.numpy(), continues=self.continues.numpy(), **info)

    @classmethod
    def load(cls, path, game: str) -> "TargetFrames":
        with np.load(path) as data:
            if str(data["game"]) != game:
                raise ValueError(f"{path} holds frames of {data['game']}, not {game}: pass the frames.npz of a "
                                 f"run on procgen:{game}")
            if "actions" not in data:
                raise ValueError(f"{path} holds frames without their actions (written before transitions were "
                                 "kept): collect again without --frames-file")
            return cls(*(torch.from_numpy(data[k]) for k in ("frames", "actions", "next_frames", "continues")))


def collect_frames(agent, game: str, options: list[str], frames: int, num_envs: int, policy: str, seed: int,
                   distribution_mode: str, stride: int = FRAME_STRIDE, num_levels: int = 0,
                   start_level: int = 0) -> TargetFrames:
    """`frames` transitions of a domain (the full level distribution by default, or `num_levels` levels from
    `start_level`), acted on by `policy` (the agent's sampled actions, or uniform), every `stride`-th step of
    play kept so that they span whole episodes."""
    env = ProcgenVecEnv(game, num_envs, distribution_mode, num_levels=num_levels, start_level=start_level,
                        device=agent.rt.device, seed=seed, **visual_options(options))
    rng = np.random.default_rng(seed)
    shape = (frames, *env.observation_shape)
    out = TargetFrames(torch.empty(shape, dtype=torch.uint8), torch.empty(frames, dtype=torch.int64),
                       torch.empty(shape, dtype=torch.uint8), torch.empty(frames, dtype=torch.bool))
    obs, filled, step = env.reset(), 0, 0
    while filled < frames:
        actions = (rng.integers(0, env.num_actions, num_envs) if policy == "random"
                   else agent.act(obs).cpu().numpy())
        kept = step % stride == 0
        before = env.last_frames.copy() if kept else None   # the frames acted on, before the env moves on
        after, _, first = env.step_numpy(actions)
        if kept:
            take = min(num_envs, frames - filled)
            keep = slice(filled, filled + take)
            out.frames[keep] = torch.from_numpy(before[:take])
            out.actions[keep] = torch.from_numpy(np.asarray(actions[:take], dtype=np.int64))
            out.next_frames[keep] = torch.from_numpy(after[:take])
            out.continues[keep] = torch.from_numpy(~first[:take].astype(bool))
            filled += take
        obs = env.as_tensor(env.last_frames)
        step += 1
    return out
