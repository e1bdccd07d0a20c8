"""Environments: Procgen through gym3 on torch tensors, and a stable-baselines3 adapter."""

from .procgen import (GAMES, PROTOCOLS, EpisodeStats, ProcgenVecEnv, Protocol, check_game,
                      normalized_score)

__all__ = ["GAMES", "PROTOCOLS", "EpisodeStats", "ProcgenVecEnv", "Protocol", "check_game", "normalized_score"]
