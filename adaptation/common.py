"""What every adaptation task shares: image constants, the error a user's input raises, and the held-out
split that selects a source model where no selection data is given."""

from __future__ import annotations

import torch

from workbench.checkpoint import CheckpointError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_MEAN, DIGITS_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class DataError(ValueError):
    """A problem with user-supplied data (missing image, bad label, empty list ...)."""


# Problems with what a user passed (data, checkpoints, settings): one line each, and under torchrun found before
# training starts and raised on every rank alike (Distributed.main_first).
INPUT_ERRORS = (ValueError, CheckpointError, FileNotFoundError)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(indices to fit on, indices held out): a seeded `fraction` of range(n) held out, both sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, int(round(n * fraction)))
    return sorted(order[n_hold:]), sorted(order[:n_hold])
