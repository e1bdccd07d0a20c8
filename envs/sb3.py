"""The Procgen vector env as a stable-baselines3 `VecEnv` (gymnasium spaces).

    from envs.sb3 import ProcgenSB3VecEnv
    venv = ProcgenSB3VecEnv(ProcgenVecEnv("starpilot", 64, num_levels=200))
    model = stable_baselines3.PPO("CnnPolicy", venv)

Finished episodes are reported in `info["episode"] = {"r", "l"}` as SB3's
Monitor does, so SB3's logger shows `rollout/ep_rew_mean`. `BackboneExtractor` puts any
registry backbone into an SB3 policy:

    PPO("CnnPolicy", venv, policy_kwargs={"features_extractor_class": BackboneExtractor,
                                          "features_extractor_kwargs": {"backbone": "impala_1x"}})
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from workbench.backbones import create_backbone

from .procgen import ProcgenVecEnv


class ProcgenSB3VecEnv(VecEnv):
    def __init__(self, env: ProcgenVecEnv):
        self.venv = env
        self.render_mode = None
        self._actions = None
        super().__init__(env.num_envs, spaces.Box(0, 255, env.observation_shape, np.uint8),
                         spaces.Discrete(env.num_actions))
        self._returns = np.zeros(env.num_envs)
        self._lengths = np.zeros(env.num_envs, dtype=np.int64)

    def reset(self) -> np.ndarray:
        self.venv.reset()
        return self.venv.last_frames

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, dones = self.venv.step_numpy(self._actions)
        self._returns += rewards
        self._lengths += 1
        infos = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            infos[i]["episode"] = {"r": float(self._returns[i]), "l": int(self._lengths[i])}
            # Procgen resets inside the step: the terminal frame is not returned, the next episode's first is.
            infos[i]["terminal_observation"] = obs[i]
            self._returns[i], self._lengths[i] = 0.0, 0
        return obs, rewards, dones.copy(), infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name, indices=None):
        if attr_name == "render_mode":
            return [None] * len(self._get_indices(indices))
        raise AttributeError(attr_name)

    def set_attr(self, attr_name, value, indices=None) -> None:
        raise AttributeError(f"ProcgenSB3VecEnv does not forward attribute {attr_name!r}")

    def env_method(self, method_name, *args, indices=None, **kwargs):
        raise AttributeError(f"ProcgenSB3VecEnv does not forward method {method_name!r}")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(self._get_indices(indices))

    def seed(self, seed=None):
        return [None] * self.num_envs  # Procgen levels are seeded at construction (ProcgenVecEnv(seed=...))


class BackboneExtractor(BaseFeaturesExtractor):
    """A registry backbone as an SB3 features extractor (SB3 hands it NCHW images scaled to [0, 1])."""

    def __init__(self, observation_space: spaces.Box, backbone: str = "impala_1x"):
        net = create_backbone(backbone)
        super().__init__(observation_space, net.out_dim)
        self.net = net

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)
