"""Soft-binned marginals of an agent's units on its own play: what BUFR stores with a source model
(Eastwood et al., ICLR 2022, "Source-Free Adaptation to Measurement Shift via Bottom-Up Feature
Restoration", section 3) and restores on the target (agents.adapt.bufr).

Per unit of each tracked layer, from the source's activations a_1..a_N:

    range     [m, M] = [min a, max a + 1e-5];  activations are divided by s = M - m
    edges     e_0 < ... < e_B, B = 8 equal bins over [m/s, M/s], plus an open bin on each side (B + 2 bins)
    soft bin  u(a) = softmax_k((k x + b_k) / tau),  x = a / s,  k = 1..B+2,  b = cumsum(0, -e_0, ..., -e_B)
              (the soft binning of Neural Decision Forests: as tau -> 0, the one-hot of the bin holding x)
    counts    P = sum_i u(a_i)   (the target batch's Q alike, differentiably)

and the surprise of a unit is the population stability index, the symmetric KL of the normalised counts
with entropies in units of log(B + 2):  PSI = KL(p || q) + KL(q || p). These follow the official code
(lib/stats_layers.py SoftBinStats, lib/surprise.py surprise_soft_bins: n_bins 8, tau 0.01, EPS 1e-8 in the
logs, no smoothing). Its "fc" setting tracks the classifier's dense features and the logits; here the
encoder's dense layer before its ReLU (`backbone.fc`, 256 units) and the policy logits (15 units).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from envs.procgen import PROTOCOLS

from .rollouts import FRAME_STRIDE, collect_frames

N_BINS = 8            # equal-width bins over a unit's source range (n_bins)
TAU = 0.01            # soft-binning temperature on range-normalised activations (tau)
# added to each unit's maximum, to keep it inside the last bin; the official code adds surprise.EPS = 1e-8
# (stats_layers.py L435), which float32 loses beside any maximum above about 0.1, so ours is larger
RANGE_EPS = 1e-5
LOG_EPS = 1e-8        # inside the logs of the surprise (surprise.EPS)
LAYERS = ("features", "logits")
STATS_FRAMES = 2048   # frames of the trained agent's own play measured at the end of training (32k env steps)
STATS_SEED_OFFSET = 4242


def bins_from_range(mins: torch.Tensor, maxs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per unit: the scale s = max - min (after the max is nudged up) and the B + 1 edges over [min/s, max/s]."""
    maxs = maxs + RANGE_EPS
    scale = (maxs - mins).clamp_min(RANGE_EPS)
    steps = torch.linspace(0, 1, N_BINS + 1, device=mins.device, dtype=mins.dtype)
    lo, hi = mins / scale, maxs / scale
    return {"scale": scale, "edges": lo[:, None] + (hi - lo)[:, None] * steps}


def soft_assignments(activations: torch.Tensor, bins: dict[str, torch.Tensor], tau: float = TAU) -> torch.Tensor:
    """u(a) for activations (n, units): (units, n, B + 2), each row summing to 1."""
    x = (activations / bins["scale"]).T[:, :, None]                                      # (units, n, 1)
    edges = bins["edges"]
    slopes = torch.arange(1, edges.shape[1] + 2, device=x.device, dtype=x.dtype)          # k = 1..B+2
    offsets = torch.cumsum(torch.cat([torch.zeros_like(edges[:, :1]), -edges], 1), 1)   # (units, B+2)
    return torch.softmax((x * slopes + offsets[:, None, :]) / tau, dim=2)


def soft_counts(activations: torch.Tensor, bins: dict[str, torch.Tensor]) -> torch.Tensor:
    """The soft counts of each unit's bins: (units, B + 2)."""
    return soft_assignments(activations, bins).sum(1)


def population_stability_index(p_counts: torch.Tensor, q_counts: torch.Tensor) -> torch.Tensor:
    """Per unit, KL(p || q) + KL(q || p) of the normalised counts, in units of log(number of bins)."""
    p = p_counts / p_counts.sum(1, keepdim=True)
    q = q_counts / q_counts.sum(1, keepdim=True)
    log_p, log_q = (p + LOG_EPS).log(), (q + LOG_EPS).log()
    return ((p * (log_p - log_q)).sum(1) + (q * (log_q - log_p)).sum(1)) / math.log(p.shape[1])


def restoration_loss(activations: dict[str, torch.Tensor], layers: dict) -> torch.Tensor:
    """BUFR's feature-restoration loss on a batch: the mean PSI over the units of each tracked layer, summed
    over the layers (the official "fc" type: features and logits); `layers`: the stored statistics."""
    total = 0.0
    for name in LAYERS:
        device = activations[name].device
        stored = layers[name]
        bins = {"scale": stored["scale"].to(device), "edges": stored["edges"].to(device)}
        total = total + population_stability_index(stored["counts"].to(device),
                                                   soft_counts(activations[name], bins)).mean()
    return total


@contextmanager
def dense_layer_outputs(model):
    """Records the output of the encoder's dense layer (`backbone.fc`, before its ReLU) on every forward."""
    dense = getattr(model.backbone, "fc", None)
    if dense is None:
        raise ValueError(f"BUFR tracks the encoder's dense layer, and {type(model.backbone).__name__} has no `fc`: "
                         "use an IMPALA backbone")
    seen: list[torch.Tensor] = []
    handle = dense.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def tracked_activations(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tracked layers' activations on a batch of (runtime-prepared) images, with their graph."""
    with dense_layer_outputs(model) as dense:
        logits = model(images)[0]
    return {"features": dense[-1].float(), "logits": logits.float()}


@torch.no_grad()
def measure_statistics(model, frames: torch.Tensor, runtime, batch: int = 512) -> dict:
    """The soft-binned marginals of every tracked unit on uint8 frames (N, 64, 64, 3), in eval mode: ranges
    first, then the counts, as the official code's two passes."""
    model.eval()
    parts = [tracked_activations(model, runtime.images(frames[i:i + batch])) for i in range(0, len(frames), batch)]
    out = {}
    for name in LAYERS:
        acts = torch.cat([p[name] for p in parts]).cpu()
        bins = bins_from_range(acts.min(0).values, acts.max(0).values)
        out[name] = {**bins, "counts": soft_counts(acts, bins)}
    return out


def source_statistics(agent, game: str, visual: list, protocol: str, frames: int = STATS_FRAMES, seed: int = 0,
                      stride: int = FRAME_STRIDE) -> dict:
    """The agent's feature statistics on its own play (sampled actions) on its training levels in its own
    visuals: BUFR's source data. What the checkpoint keeps as `feature_statistics`."""
    split = PROTOCOLS[protocol]
    play = collect_frames(agent, game, list(visual), frames, min(64, frames), "source", seed + STATS_SEED_OFFSET,
                          split.distribution_mode, stride, num_levels=split.num_levels, start_level=split.start_level)
    return {"layers": measure_statistics(agent.model, play.frames, agent.rt), "frames": frames, "stride": stride,
            "levels": [split.start_level, split.start_level + split.num_levels], "visual": list(visual),
            "n_bins": N_BINS, "tau": TAU}
