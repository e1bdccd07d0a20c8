"""Reproducible label noise for robust-training experiments (self-adaptive training's setting).

Exactly round(rate * N) training labels are changed, chosen by a seeded permutation:

- symmetric: the new label is drawn uniformly from the K - 1 other classes;
- pairflip:  the new label is the next class, y -> (y + 1) mod K;
- uniform:   the new label is drawn uniformly from all K classes, the self-adaptive training code's
             corruption, so about rate * (K - 1) / K of the labels end up wrong (72% at its "80%").

So with symmetric and pairflip a rate of 0.4 means 40% of the labels are wrong, not "40% re-drawn,
some back to themselves"; uniform is that second reading, for comparing with the SAT paper's tables.
The clean labels stay with the data set for reporting how many noisy labels a model fits.
"""

from __future__ import annotations

import numpy as np

NOISE_TYPES = ("symmetric", "pairflip", "uniform")


def corrupt_labels(labels, rate: float, num_classes: int, noise_type: str = "symmetric",
                   seed: int = 0) -> np.ndarray:
    """A corrupted copy of `labels` (N,) with exactly round(rate * N) of them changed (uniform: re-drawn)."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}: choose one of {', '.join(NOISE_TYPES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--label-noise must be a rate in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    flipped = rng.permutation(len(labels))[:int(round(rate * len(labels)))]
    noisy = labels.copy()
    if noise_type == "pairflip":
        noisy[flipped] = (labels[flipped] + 1) % num_classes
    elif noise_type == "uniform":
        noisy[flipped] = rng.integers(0, num_classes, size=len(flipped))
    else:  # an offset in 1..K-1 never lands back on the true class
        noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return noisy
