"""`workbench track`: crowd pose tracking of videos with a trained detector and pose model.

    workbench train-source --task detection --data builtin:crowds/flat --out runs/detector
    workbench train-source --task pose --data builtin:figures/flat --out runs/pose
    workbench track --detector runs/detector --pose runs/pose --data builtin:crowds/flat:test
    workbench evaluate --task tracking --model runs/track-... --data builtin:crowds/flat:test
"""

from __future__ import annotations

from workbench.arguments import ArgumentParser, non_negative_int, seed, unit_interval
from workbench.files import WriteError
from workbench.runtime import DEVICE_CHOICES

from ..cli import _fail, _write_failed
from ..common import INPUT_ERRORS
from . import pipeline


def track_main(argv=None) -> int:
    d = pipeline.TrackConfig()
    p = ArgumentParser(prog="workbench track", description="Detect, track, estimate and smooth people in videos; "
                       "writes PoseTrack JSON tracks, GIFs with the skeletons coloured by track, and (for annotated "
                       "data) PoseTrack's MOTA, MOTP, identity switches and AP.")
    p.add_argument("--detector", required=True, help="a `train-source --task detection` run or checkpoint")
    p.add_argument("--pose", required=True, help="a pose model: a `train-source --task pose` or `adapt` run")
    p.add_argument("--data", default=d.data, help="builtin:crowds/<domain>[:split], a PoseTrack JSON file or folder, "
                   f"a video file (mp4, gif ...) or a folder of frames (default {d.data})")
    p.add_argument("--detection-threshold", type=unit_interval, default=d.detection_threshold,
                   help=f"boxes scoring below it are dropped (default {d.detection_threshold}, chosen on crowds "
                   f"flat:val)")
    p.add_argument("--flow", default=d.flow, choices=("dis", "farneback", "none"), help="optical flow that carries "
                   "the previous frame's people into the next (none, the default chosen on crowds flat:val: "
                   "detections alone)")
    p.add_argument("--no-smooth", action="store_true", help="leave the joints unsmoothed over time")
    p.add_argument("--appearance-weight", type=unit_interval, default=d.appearance_weight,
                   help=f"weight of the colour-histogram appearance cost against the IoU cost (0: SORT; default "
                   f"{d.appearance_weight}, chosen on crowds flat:val)")
    p.add_argument("--max-age", type=non_negative_int, default=d.max_age, help="frames a track survives unmatched")
    p.add_argument("--joint-threshold", type=unit_interval, default=d.joint_threshold, help="joints scoring "
                   f"below it are left out of the tracks (default {d.joint_threshold}, chosen on crowds flat:val)")
    p.add_argument("--no-flip-test", action="store_true", help="estimate poses without flip testing")
    p.add_argument("--no-video", action="store_true", help="skip the GIFs")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default="", help="run directory (default runs/track-<detector>-s<seed>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = pipeline.TrackConfig(detector=a.detector, pose=a.pose, data=a.data,
                               detection_threshold=a.detection_threshold, flow=a.flow, smooth=not a.no_smooth,
                               appearance_weight=a.appearance_weight, max_age=a.max_age,
                               joint_threshold=a.joint_threshold, flip_test=not a.no_flip_test,
                               video=not a.no_video, seed=a.seed, device=a.device, run_dir=a.out,
                               progress=not a.no_progress)
    try:
        if a.out:
            from workbench.logging import claim_run_dir

            claim_run_dir(a.out, a.overwrite, "--out", "")
        m = pipeline.run_tracking(cfg)
    except INPUT_ERRORS as exc:
        return _fail(exc)
    except WriteError as exc:
        return _write_failed(exc)
    print(f"tracked {m['videos']} video(s), {m['frames']} frames, {m['tracks']} tracks "
          f"({m['frames_per_second']:.1f} frames/s)")
    if "mota" in m:
        print(f"on {m['data']}: MOTA {m['mota']:.1f}, MOTP {m['motp']:.1f}, AP {m['ap']:.1f}, "
              f"identity switches {m['id_switches']}")
    print(f"tracks (PoseTrack JSON), videos and metrics.json in {m['run_dir']}")
    return 0


