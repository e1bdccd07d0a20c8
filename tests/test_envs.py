import numpy as np
import pytest
import torch

from envs.procgen import GAMES, EpisodeStats, ProcgenVecEnv, normalized_score, visual_options
from envs.sb3 import ProcgenSB3VecEnv


def test_unknown_game_fails_with_the_list():
    with pytest.raises(ValueError) as err:
        ProcgenVecEnv("starpilott", 2)
    msg = str(err.value)
    assert "starpilott" in msg and all(g in msg for g in GAMES) and "\n" not in msg


def test_step_returns_tensors_and_tracks_episodes():
    env = ProcgenVecEnv("bigfish", 3, num_levels=10, seed=1)
    obs = env.reset()
    assert obs.shape == (3, 64, 64, 3) and obs.dtype == torch.uint8
    manual_returns, manual = np.zeros(3), []
    for _ in range(600):
        obs, rew, done = env.step(torch.randint(0, 15, (3,)))
        assert rew.dtype == torch.float32 and done.dtype == torch.bool and obs.dtype == torch.uint8
        manual_returns += rew.numpy()
        for i in np.flatnonzero(done.numpy()):
            manual.append(manual_returns[i])
            manual_returns[i] = 0
    returns, lengths = env.stats.drain()
    assert len(manual) > 0, "600 random steps in bigfish end some episodes"
    np.testing.assert_allclose(sorted(returns), sorted(manual))
    assert all(length > 0 for length in lengths)
    assert env.stats.drain() == ([], [])


def test_episode_stats_accounting():
    stats = EpisodeStats(2)
    stats.update(np.array([1.0, 2.0]), np.array([False, True]))
    stats.update(np.array([3.0, 4.0]), np.array([True, False]))
    assert stats.drain() == ([2.0, 4.0], [1, 2])
    assert stats.returns.tolist() == [0.0, 4.0]


def test_normalized_score_constants():
    assert normalized_score("starpilot", "easy", 64) == pytest.approx(1.0)
    assert normalized_score("starpilot", "hard", 1.5) == pytest.approx(0.0)
    assert normalized_score("fruitbot", "easy", (32.4 - 1.5) / 2) == pytest.approx(0.5)


def test_visual_options():
    assert visual_options(["no-backgrounds", "monochrome"]) == {"use_backgrounds": False,
                                                                "use_monochrome_assets": True}
    with pytest.raises(ValueError, match="restrict-themes"):
        visual_options(["sepia"])
    env = ProcgenVecEnv("coinrun", 2, seed=0, **visual_options(["no-backgrounds"]))
    assert env.reset().shape == (2, 64, 64, 3)


def test_sb3_adapter_speaks_vecenv():
    from gymnasium import spaces

    venv = ProcgenSB3VecEnv(ProcgenVecEnv("bigfish", 4, seed=0))
    assert venv.observation_space == spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert venv.action_space == spaces.Discrete(15)
    obs = venv.reset()
    assert obs.shape == (4, 64, 64, 3) and obs.dtype == np.uint8
    episodes = []
    for _ in range(600):
        obs, rew, done, infos = venv.step(np.random.randint(0, 15, size=4))
        assert rew.shape == (4,) and done.shape == (4,) and len(infos) == 4
        episodes += [info["episode"] for d, info in zip(done, infos) if d]
    assert episodes and all({"r", "l"} <= set(e) for e in episodes)


def test_sb3_ppo_runs_on_the_adapter():
    from stable_baselines3 import PPO

    from envs.sb3 import BackboneExtractor

    venv = ProcgenSB3VecEnv(ProcgenVecEnv("bigfish", 2, seed=0))
    model = PPO("CnnPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, device="cpu",
                policy_kwargs={"features_extractor_class": BackboneExtractor,
                               "features_extractor_kwargs": {"backbone": "impala_1x"}})
    model.learn(total_timesteps=32)
    assert model.num_timesteps == 32
    assert sum(p.numel() for p in model.policy.features_extractor.parameters()) == 622_144
