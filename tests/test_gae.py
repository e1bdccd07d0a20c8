import torch

from agents.ppo import compute_gae


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
