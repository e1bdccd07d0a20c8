"""Procgen (Cobbe et al. 2020) as a vectorised environment on torch tensors.

The gym3 interface steps all environments in C++ threads; this wrapper turns
its numpy output into torch tensors on the chosen device (one host-to-device
copy of the uint8 frames per step), tracks finished episodes, and knows the
normalisation constants and the train/test level protocols.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
         "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
NUM_ACTIONS = 15
OBS_SHAPE = (64, 64, 3)
DISTRIBUTION_MODES = ("easy", "hard")

# (R_min, R_max) per game and mode, for normalised score = (R - R_min) / (R_max - R_min).
SCORE_RANGES = {
    "easy": {"coinrun": (5, 10), "starpilot": (2.5, 64), "caveflyer": (3.5, 12), "dodgeball": (1.5, 19),
             "fruitbot": (-1.5, 32.4), "chaser": (0.5, 13), "miner": (1.5, 13), "jumper": (1, 10),
             "leaper": (1.5, 10), "maze": (5, 10), "bigfish": (1, 40), "heist": (3.5, 10),
             "climber": (2, 12.6), "plunder": (4.5, 30), "ninja": (3.5, 10), "bossfight": (0.5, 13)},
    "hard": {"coinrun": (5, 10), "starpilot": (1.5, 35), "caveflyer": (2, 13.4), "dodgeball": (1.5, 19),
             "fruitbot": (-0.5, 27.2), "chaser": (0.5, 14.2), "miner": (1.5, 20), "jumper": (1, 10),
             "leaper": (1.5, 10), "maze": (4, 10), "bigfish": (0, 40), "heist": (2, 10),
             "climber": (1, 12.6), "plunder": (3, 30), "ninja": (2, 10), "bossfight": (0.5, 13)},
}


@dataclass(frozen=True)
class Protocol:
    """A train/test split of Procgen levels. Testing always uses the full distribution (num_levels=0)."""

    distribution_mode: str
    num_levels: int
    start_level: int
    total_steps: int
    games: tuple[str, ...]


PROTOCOLS = {
    "easy-200": Protocol("easy", 200, 0, 25_000_000, GAMES),
    "hard-500": Protocol("hard", 500, 0, 200_000_000,
                         ("caveflyer", "climber", "dodgeball", "fruitbot", "jumper", "starpilot")),
}


def check_game(name: str) -> str:
    if name not in GAMES:
        raise ValueError(f"unknown Procgen game {name!r}: valid games are {', '.join(GAMES)}")
    return name


def normalized_score(game: str, mode: str, episode_return: float) -> float:
    r_min, r_max = SCORE_RANGES[mode][check_game(game)]
    return (episode_return - r_min) / (r_max - r_min)


def _import_procgen():
    # procgen imports the unmaintained `gym` package, which prints a deprecation banner on
    # stderr at import; it concerns gym, not this code, so keep it out of the user's console.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        from procgen import ProcgenGym3Env
    return ProcgenGym3Env


class EpisodeStats:
    """Running return/length per environment; finished episodes are collected until drained."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []

    def update(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.returns += rewards
        self.lengths += 1
        for i in np.flatnonzero(dones):
            self.finished_returns.append(float(self.returns[i]))
            self.finished_lengths.append(int(self.lengths[i]))
            self.returns[i] = 0.0
            self.lengths[i] = 0

    def drain(self) -> tuple[list[float], list[int]]:
        out = (self.finished_returns, self.finished_lengths)
        self.finished_returns, self.finished_lengths = [], []
        return out


class ProcgenVecEnv:
    """`num_envs` Procgen environments stepping together, with torch tensors in and out.

    reset() -> obs (N, 64, 64, 3) uint8 on `device`
    step(actions) -> obs, rewards (N,) float32, dones (N,) bool

    `dones[i]` marks that the episode in env i ended with this step; Procgen
    resets it by itself, so `obs[i]` is then the first frame of the next episode.
    `num_levels=0` is the full level distribution (used for testing).
    """

    def __init__(self, env_name: str, num_envs: int = 64, distribution_mode: str = "easy",
                 num_levels: int = 0, start_level: int = 0, device: torch.device | str = "cpu",
                 seed: int | None = None, use_backgrounds: bool = True, restrict_themes: bool = False,
                 use_monochrome_assets: bool = False, num_threads: int | None = None):
        check_game(env_name)
        if distribution_mode not in DISTRIBUTION_MODES:
            raise ValueError(f"unknown distribution mode {distribution_mode!r}: use easy or hard")
        if num_envs < 1:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        kwargs = dict(num=num_envs, env_name=env_name, distribution_mode=distribution_mode,
                      num_levels=num_levels, start_level=start_level, use_backgrounds=use_backgrounds,
                      restrict_themes=restrict_themes, use_monochrome_assets=use_monochrome_assets)
        if seed is not None:
            kwargs["rand_seed"] = int(seed) % 2**31
        if num_threads is not None:
            kwargs["num_threads"] = num_threads
        self.env = _import_procgen()(**kwargs)
        self.env_name, self.distribution_mode = env_name, distribution_mode
        self.num_envs, self.num_levels, self.start_level = num_envs, num_levels, start_level
        self.device = torch.device(device)
        self.num_actions = NUM_ACTIONS
        self.observation_shape = OBS_SHAPE
        self.stats = EpisodeStats(num_envs)
        self._last_obs: np.ndarray | None = None

    def as_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def reset(self) -> torch.Tensor:
        """Current observations. Procgen has no explicit reset; a fresh env starts new episodes."""
        _, obs, _ = self.env.observe()
        self._last_obs = obs["rgb"]
        return self.as_tensor(self._last_obs)

    def step_numpy(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.env.act(np.asarray(actions, dtype=np.int32))
        rewards, obs, first = self.env.observe()
        rewards = rewards.astype(np.float32, copy=False)
        self.stats.update(rewards, first)
        self._last_obs = obs["rgb"]
        return self._last_obs, rewards, first

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        obs, rewards, dones = self.step_numpy(actions.cpu().numpy())
        return self.as_tensor(obs), self.as_tensor(rewards), self.as_tensor(dones)

    @property
    def last_frames(self) -> np.ndarray:
        """The latest numpy observations (N, 64, 64, 3), e.g. for videos."""
        return self._last_obs

    def normalized_score(self, episode_return: float) -> float:
        return normalized_score(self.env_name, self.distribution_mode, episode_return)

    def close(self) -> None:
        self.env = None


VISUAL_OPTIONS = {"no-backgrounds": ("use_backgrounds", False), "restrict-themes": ("restrict_themes", True),
                  "monochrome": ("use_monochrome_assets", True)}


def visual_options(names: Sequence[str]) -> dict:
    """Visual-domain variants: the same levels and physics drawn with other assets. restrict-themes also
    shrinks or stretches the hitboxes that a game sizes by their sprite's aspect ratio (every entity gets its
    first theme's sprite), so a collision now and then differs between two renderings of one level."""
    options = {}
    for name in names:
        if name not in VISUAL_OPTIONS:
            raise ValueError(f"unknown visual option {name!r}: choose from {', '.join(VISUAL_OPTIONS)}")
        key, value = VISUAL_OPTIONS[name]
        options[key] = value
    return options


DEFAULT_DOMAIN = "default"   # the renderer's own visuals: no option set (every theme, backgrounds, colour)


def visual_domain(names: Sequence[str]) -> list[str]:
    """Option names (or `default` alone) -> the domain's options in the renderer's order, so that a domain
    has one name; unknown names fail with the valid ones listed."""
    if list(names) == [DEFAULT_DOMAIN]:
        return []
    visual_options(names)
    return [name for name in VISUAL_OPTIONS if name in names]


def domain_name(names: Sequence[str]) -> str:
    """A visual domain's name: its options joined by + in the renderer's order, or `default`."""
    return "+".join(visual_domain(names)) or DEFAULT_DOMAIN
