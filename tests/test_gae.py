from types import SimpleNamespace

import numpy as np
import torch

from agents.ppo import PPO, PPOConfig, compute_gae
from workbench.runtime import Runtime


def test_gae_hand_computed_with_episode_end():
    # gamma 0.9, lambda 0.8; the episode ends with transition 1.
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    dones = torch.tensor([[False], [True], [False]])
    adv, ret = compute_gae(rewards, values, dones, torch.tensor([2.0]), gamma=0.9, gae_lambda=0.8)
    # t=2: delta = 3 + 0.9*2.0 - 1.5 = 3.3 ; A = 3.3
    # t=1: terminal: delta = 2 - 1.0 = 1.0 ; A = 1.0
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4 ; A = 1.4 + 0.72 * 1.0 = 2.12
    torch.testing.assert_close(adv.squeeze(1), torch.tensor([2.12, 1.0, 3.3]))
    torch.testing.assert_close(ret.squeeze(1), torch.tensor([2.62, 2.0, 4.8]))


def brute_force_gae(rewards, values, dones, next_value, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, summed until the episode ends."""
    T, N = rewards.shape
    values_ext = torch.cat([values, next_value[None]], 0)
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                nonterminal = 0.0 if dones[k, n] else 1.0
                delta = rewards[k, n] + gamma * nonterminal * values_ext[k + 1, n] - values[k, n]
                total += weight * delta
                if dones[k, n]:
                    break
                weight *= gamma * lam
            out[t, n] = total
    return out


def test_gae_matches_brute_force_sum():
    g = torch.Generator().manual_seed(3)
    T, N = 12, 4
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = torch.rand(T, N, generator=g) < 0.2
    next_value = torch.randn(N, generator=g, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, dones, next_value, 0.99, 0.95)
    torch.testing.assert_close(adv, brute_force_gae(rewards, values, dones, next_value, 0.99, 0.95))
    torch.testing.assert_close(ret, adv + values)


def test_reward_scaler_discounts_its_return_with_its_own_gamma():
    """VecNormalize's scaler: divide r_t by the running std of G_t = gamma_r G_{t-1} + r_t (reset after an
    episode ends), clip to 10; gamma_r is 0.99 by default, not GAE's 0.999."""
    cfg = PPOConfig(num_envs=1)
    assert (cfg.reward_norm_gamma, cfg.gamma) == (0.99, 0.999)
    agent = PPO(SimpleNamespace(num_actions=15), cfg, Runtime.create("cpu", "fp32"))
    g = np.random.default_rng(0)
    rewards = g.exponential(1.0, 300).astype(np.float32)
    dones = np.zeros(300, bool)
    dones[[99, 199]] = True
    scaled = [agent.reward_normalizer(rewards[t:t + 1], dones[t:t + 1])[0] for t in range(300)]

    returns, expected, g_t = [], [], 0.0
    for r, d in zip(rewards.astype(np.float64), dones):
        g_t = 0.99 * g_t + r
        returns.append(g_t)
        # pooled moments of every return so far and the scaler's prior (mean 0, var 1, weight 1e-4)
        count = 1e-4 + len(returns)
        mean = sum(returns) / count
        var = (1e-4 * 1.0 + sum(x * x for x in returns)) / count - mean**2
        expected.append(np.clip(r / np.sqrt(var + 1e-8), -10, 10))
        g_t = 0.0 if d else g_t
    np.testing.assert_allclose(scaled, expected, rtol=1e-5)
