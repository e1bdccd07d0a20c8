"""Prioritised experience replay (Schaul et al. 2016) for vectorised envs, with n-step returns.

Frames are stored once, as uint8, in a ring of shape (capacity // num_envs, num_envs, H, W, C):
transition (t, e) is (obs[t, e], action[t, e], reward[t, e], done[t, e]) and its n-step target
reads rewards t .. t+n-1 and the frame at t+n, so next observations cost no memory.

As the mixreg paper ran it (anyrl's PrioritizedReplayBuffer, fed by its DQN.train):
  priority        p_i = (l_i + eps)^alpha,  eps 0.1, alpha 0.5, both applied when a priority is written (the
                  sum tree holds p_i); l_i = w_i * KL_i, the importance-weighted loss of the update that
                  sampled i (anyrl's DQN passes `weights * losses` to update_weights). New transitions get
                  (max l + eps)^alpha, max l the largest l passed so far, starting at first_max = 1
  sampling        P(i) = p_i / sum_k p_k, independent draws with replacement (anyrl's FloatBuffer.sample;
                  not Schaul et al.'s stratified segments), through a sum tree
  importance      w_i = (N P(i))^-beta / max_j (N P(j))^-beta,  beta 0.4 (constant in the paper)
                  the max is the largest possible weight, that of the smallest priority in the
                  buffer (a min tree), not the largest in the batch: weights do not depend on
                  which other transitions were drawn.
"""

from __future__ import annotations

import numpy as np
import torch


class SegmentTree:
    """Binary tree over `size` leaves whose internal nodes combine their two children with `op`."""

    op = staticmethod(np.add)
    neutral = 0.0  # the value of an empty leaf: op(x, neutral) == x

    def __init__(self, size: int):
        self.size = 1
        while self.size < size:
            self.size *= 2
        self.nodes = np.full(2 * self.size, self.neutral, dtype=np.float64)

    def leaves(self, index: np.ndarray) -> np.ndarray:
        return self.nodes[self.size + np.asarray(index)]

    def update(self, index: np.ndarray, values: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64) + self.size
        self.nodes[index] = values
        parents = np.unique(index // 2)
        while parents[0] >= 1:
            self.nodes[parents] = self.op(self.nodes[2 * parents], self.nodes[2 * parents + 1])
            if parents[0] == 1:
                break
            parents = np.unique(parents // 2)


class SumTree(SegmentTree):
    """Internal nodes hold the sums of their children: proportional sampling in O(log n)."""

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index holding each cumulative `mass` (vectorised descent)."""
        node = np.ones(len(mass), dtype=np.int64)
        mass = np.asarray(mass, dtype=np.float64).copy()
        while node[0] < self.size:
            left = 2 * node
            go_right = mass >= self.nodes[left]
            mass -= np.where(go_right, self.nodes[left], 0.0)
            node = left + go_right
        return node - self.size


class MinTree(SegmentTree):
    """Internal nodes hold the minima of their children: the smallest priority in O(1), kept in O(log n)."""

    op = staticmethod(np.minimum)
    neutral = np.inf

    @property
    def min(self) -> float:
        return float(self.nodes[1])


class PrioritizedReplay:
    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, n_step: int = 3, gamma: float = 0.99,
                 alpha: float = 0.5, eps: float = 0.1, first_max: float = 1.0):
        self.rows = max(capacity // num_envs, n_step + 2)
        self.num_envs, self.n_step, self.gamma, self.alpha, self.eps = num_envs, n_step, gamma, alpha, eps
        self.obs = np.zeros((self.rows, num_envs, *obs_shape), dtype=np.uint8)
        self.actions = np.zeros((self.rows, num_envs), dtype=np.int64)
        self.rewards = np.zeros((self.rows, num_envs), dtype=np.float32)
        self.dones = np.zeros((self.rows, num_envs), dtype=bool)
        self.tree = SumTree(self.rows * num_envs)      # p_i, 0 where no complete transition is stored
        self.min_tree = MinTree(self.rows * num_envs)  # p_i, +inf there
        self.max_loss = first_max  # new transitions get priority (max_loss + eps)^alpha (anyrl's _max_weight_arg)
        self.t = 0          # rows written so far
        self.valid = 0      # transitions whose n-step target is complete

    @staticmethod
    def bytes_needed(capacity: int, obs_shape: tuple) -> int:
        return int(capacity * (np.prod(obs_shape) + 8 + 4 + 1) + 4 * capacity * 8)

    @property
    def capacity(self) -> int:
        return self.rows * self.num_envs

    def __len__(self) -> int:
        return self.valid

    def _set_priorities(self, index: np.ndarray, priorities: np.ndarray) -> None:
        """Write p_i to both trees; p_i = 0 removes a transition from sampling and from the minimum."""
        self.tree.update(index, priorities)
        self.min_tree.update(index, np.where(priorities > 0, priorities, np.inf))

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> None:
        """One vector step: obs the envs saw, the actions taken, and what followed."""
        row = self.t % self.rows
        self.obs[row], self.actions[row], self.rewards[row], self.dones[row] = obs, actions, rewards, dones
        envs = np.arange(self.num_envs)
        self._set_priorities(row * self.num_envs + envs, np.zeros(self.num_envs))  # the row's old targets are gone
        self.t += 1
        if self.t > self.n_step:
            ready = (self.t - 1 - self.n_step) % self.rows  # its frame t+n has just been written
            self._set_priorities(ready * self.num_envs + envs,
                                 np.full(self.num_envs, (self.max_loss + self.eps) ** self.alpha))
            self.valid = min(self.t - self.n_step, self.rows - self.n_step) * self.num_envs

    def importance_weights(self, priorities: np.ndarray, beta: float) -> np.ndarray:
        """w_i = (N P(i))^-beta / (N P_min)^-beta = (p_i / p_min)^-beta, in (0, 1]."""
        total, n = self.tree.total, len(self)
        largest = (n * self.min_tree.min / total) ** (-beta)
        return (n * priorities / total) ** (-beta) / largest

    def sample(self, batch_size: int, beta: float, rng: np.random.Generator,
               one_step: bool = False) -> dict[str, np.ndarray]:
        """Proportional sample (independent draws, with replacement) with importance weights and n-step targets;
        with `one_step` also each transition's next frame (`one_step_obs`, one row on: a sampled transition's
        rows up to t+n are all current) and whether it continues the episode (`one_step_continues`: when the
        episode ended with this step, the next row holds the next episode's first frame)."""
        total = self.tree.total
        index = self.tree.find(rng.uniform(0.0, total, batch_size))
        priorities = self.tree.leaves(index)
        for _ in range(10):  # float round-off at a leaf edge can land on an empty leaf: draw again
            empty = priorities <= 0
            if not empty.any():
                break
            index[empty] = self.tree.find(rng.uniform(0, total, empty.sum()))
            priorities = self.tree.leaves(index)
        weights = self.importance_weights(priorities, beta)
        row, env = index // self.num_envs, index % self.num_envs
        returns, discounts = self.n_step_targets(row, env)
        batch = {"index": index, "obs": self.obs[row, env], "actions": self.actions[row, env], "returns": returns,
                 "discounts": discounts, "next_obs": self.obs[(row + self.n_step) % self.rows, env],
                 "weights": weights.astype(np.float32)}
        if one_step:
            batch.update(one_step_obs=self.obs[(row + 1) % self.rows, env], one_step_continues=~self.dones[row, env])
        return batch

    def n_step_targets(self, row: np.ndarray, env: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G = sum_k gamma^k r_{t+k} up to the first episode end; discount gamma^n, or 0 if it ended."""
        returns = np.zeros(len(row), np.float32)
        alive = np.ones(len(row), bool)
        for k in range(self.n_step):
            r = (row + k) % self.rows
            returns += alive * (self.gamma ** k) * self.rewards[r, env]
            alive &= ~self.dones[r, env]
        return returns, (alive * self.gamma ** self.n_step).astype(np.float32)

    def update_priorities(self, index: np.ndarray, losses: np.ndarray) -> None:
        """p_i = (l_i + eps)^alpha for the transitions just trained on; Rainbow passes l_i = w_i * KL_i."""
        losses = np.asarray(losses, dtype=np.float64)
        self.max_loss = max(self.max_loss, float(losses.max()))
        self._set_priorities(index, (losses + self.eps) ** self.alpha)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("obs", "actions", "rewards", "dones", "t", "valid", "max_loss")} | {
            "tree": self.tree.nodes, "min_tree": self.min_tree.nodes}

    def load_state_dict(self, state: dict) -> None:
        for k in ("obs", "actions", "rewards", "dones", "t", "valid"):
            setattr(self, k, state[k])
        self.tree.nodes = np.asarray(state["tree"], dtype=np.float64)
        if "min_tree" in state:
            self.min_tree.nodes = np.asarray(state["min_tree"], dtype=np.float64)
        else:  # a checkpoint from before the min tree: rebuild it from the sum tree's leaves
            self.min_tree = MinTree(self.capacity)
            leaves = np.arange(self.capacity)
            self.min_tree.update(leaves, np.where(self.tree.leaves(leaves) > 0, self.tree.leaves(leaves), np.inf))
        # older checkpoints kept max(loss + eps) with eps 1e-6 as `max_priority`
        self.max_loss = float(state["max_loss"] if "max_loss" in state else state["max_priority"])


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
