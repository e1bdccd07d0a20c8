"""The registry of agents: algorithm name -> (agent class, its config dataclass).

Training (`agents.train`), evaluation (`agents.evaluate`) and the adaptation of agents look agents up
here, so none of them imports another for it. A new agent is one module and one line below."""

from .ppo import PPO, PPOConfig
from .rainbow import Rainbow, RainbowConfig

ALGORITHMS = {"ppo": (PPO, PPOConfig), "rainbow": (Rainbow, RainbowConfig)}
