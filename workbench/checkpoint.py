"""Atomic checkpoints with a declared kind, validated on load.

A checkpoint is a dict saved by torch.save holding at least `format`,
`kind` (e.g. "ppo", "rainbow", "shot") and whatever the family stores
(config, model and optimiser state, counters, RNG states ...). Saving writes
a temporary file in the same directory and renames it over the target, so an
interruption never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "workbench-checkpoint-v1"
LATEST = "checkpoint.pt"
# The file names a run directory may hold its checkpoint under: training runs, adapted models, source models.
RUN_CHECKPOINTS = (LATEST, "adapted.pt", "source.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, foreign, or of the wrong kind."""


def save_checkpoint(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "kind": kind, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept either a checkpoint file or a run directory holding one of RUN_CHECKPOINTS."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in RUN_CHECKPOINTS if (path / name).exists()), path / LATEST)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory or a .pt file written by the workbench")
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; `kind` restricts which families are accepted."""
    path = resolve_checkpoint_path(path)
    try:
        # weights_only=False: checkpoints hold RNG states and numpy statistics, and only
        # files this workbench wrote are expected here (the format tag is checked below).
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, a text file ...
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}): the file is truncated "
                              f"or not a torch checkpoint; re-save it or pick another file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a workbench checkpoint (no '{FORMAT}' tag): "
                              f"pass a checkpoint written by the workbench")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and data.get("kind") not in kinds:
        raise CheckpointError(f"{path} holds a '{data.get('kind')}' checkpoint, expected "
                              f"{' or '.join(repr(k) for k in kinds)}: pass a checkpoint of that kind")
    return data
