"""Sampling of mixing weights, shared by mixreg (agents) and MixMatch (adaptation)."""

from __future__ import annotations

import torch


def sample_beta(alpha: float, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n draws from Beta(alpha, alpha), stable for very small alpha.

    Beta = X / (X + Y) with X, Y ~ Gamma(alpha). Gamma(alpha) draws underflow to 0
    for small alpha, so they are taken in log space through the identity
    Gamma(a) = Gamma(a + 1) * U^(1/a),  U ~ Uniform(0, 1).
    """
    if alpha <= 0:
        raise ValueError(f"mixing alpha must be positive, got {alpha}")
    conc = torch.full((2, n), alpha + 1.0)
    log_gamma = torch._standard_gamma(conc).log() + torch.rand(2, n).clamp_min(1e-38).log() / alpha
    return torch.sigmoid(log_gamma[0] - log_gamma[1]).to(device)
