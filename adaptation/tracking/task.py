"""Crowd pose tracking as a task of the `workbench` commands (workbench.tasks): its built-in crowds
(`workbench datasets`) and `workbench evaluate --task tracking` (PoseTrack's MOTA, MOTP, identity switches and
per-joint AP of the tracks `workbench track` wrote). Tracking has no model of its own to train or adapt: it
runs a detector (`train-source --task detection`) and a pose model (`train-source --task pose`, adapted with
`workbench adapt`)."""

from __future__ import annotations

METHODS: tuple[str, ...] = ()
DISTRIBUTED = False
BUILTIN = "crowds"  # builtin:crowds/<domain>


def builtin_domains() -> tuple[str, ...]:
    from . import crowds

    return crowds.DOMAINS


def builtin_path(domain: str):
    from . import crowds

    return crowds.domain_dir(domain)


def build_builtin(domain: str, force: bool = False) -> str:
    from . import crowds

    path = crowds.build_domain(domain, force=force)
    counts = crowds.video_counts()
    return (f"builtin:crowds/{domain}: {counts[0]} train / {counts[1]} val / {counts[2]} test videos of "
            f"{crowds.frame_count()} {crowds.IMAGE_SIZE}x{crowds.IMAGE_SIZE} frames, {len(crowds.JOINTS)} joints "
            f"(PoseTrack JSON) -> {path}")


def evaluate(a) -> dict:
    from .pipeline import evaluate_tracks

    return evaluate_tracks(a.model, a.data)
