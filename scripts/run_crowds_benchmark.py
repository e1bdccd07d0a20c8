#!/usr/bin/env python
"""Crowd pose tracking on the built-in crowds: the settings chosen on flat:val, the table on the test splits.

1. The person detector: `train-source --task detection` on builtin:crowds/flat (kept on flat:val by box AP),
   unless --detector names one.
2. Selection on builtin:crowds/flat:val with the source pose model and DIS flow: every detection threshold of
   --detection-thresholds is run, and every joint threshold of --joint-thresholds applied to its tracks; the
   pair with the best MOTA is kept (ties to the lower thresholds). The appearance weights of
   --appearance-weights are then run at that pair and the best MOTA kept, then flow (DIS) against none.
3. The table: builtin:crowds/flat:test and builtin:crowds/textured:test, with the source pose model and the
   pose model adapted source-free to the textured figures (the mean teacher), with flow (DIS) and without;
   MOTA, MOTP, AP, identity switches and frames per second, and the detector's box AP on each test split.

The pose models come from scripts/run_figures_benchmark.py (a source on flat figures and its mean teacher on
textured figures). Finished runs (a metrics.json in their folder) are reused, so the script can be stopped
and started again; results.json and table.md are written to --out.

    python scripts/run_crowds_benchmark.py --pose-source runs/figures-benchmark-val/source-s0 \\
        --pose-adapted runs/figures-benchmark-val/mean-teacher-s0 --out runs/crowds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.detection.evaluate import evaluate_detector  # noqa: E402
from adaptation.detection.source import DetectionSourceConfig, train_detector  # noqa: E402
from adaptation.tracking.data import load_videos  # noqa: E402
from adaptation.tracking.pipeline import TrackConfig, run_tracking, score_tracks  # noqa: E402

VAL, TESTS = "builtin:crowds/flat:val", ("builtin:crowds/flat:test", "builtin:crowds/textured:test")


def tracked(cfg: TrackConfig) -> dict:
    path = Path(cfg.run_dir) / "metrics.json"
    if not path.exists():
        run_tracking(cfg)
    return json.loads(path.read_text())


def rescored(run_dir: Path, data: str, joint_threshold: float) -> dict:
    """The run's tracks scored with the joints below `joint_threshold` left out."""
    pairs = [(v, json.loads((run_dir / "tracks" / f"{v.name}.json").read_text())) for v in load_videos(data)]
    return score_tracks(pairs, joint_threshold)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pose-source", required=True, help="a pose source run (figures flat)")
    p.add_argument("--pose-adapted", required=True, help="its mean teacher on the textured figures")
    p.add_argument("--detector", default=None, help="a detection run (default: trained into --out)")
    p.add_argument("--detection-thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--joint-thresholds", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--appearance-weights", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/crowds")
    args = p.parse_args(argv)
    out = Path(args.out)
    detector = Path(args.detector or out / f"detector-flat-s{args.seed}")
    if not (detector / "metrics.json").exists():
        train_detector(DetectionSourceConfig(seed=args.seed, device=args.device, run_dir=str(detector),
                                             progress=False))
    # selection starts from plain SORT with every joint kept; the thresholds are applied as they are chosen
    base = TrackConfig(detector=str(detector), pose=args.pose_source, seed=args.seed, device=args.device,
                       appearance_weight=0.0, joint_threshold=0.0, video=False, progress=False)

    # selection on flat:val
    grid = []
    for threshold in args.detection_thresholds:
        run = out / f"val-det{threshold}"
        tracked(dataclasses.replace(base, data=VAL, detection_threshold=threshold, run_dir=str(run)))
        for joint in args.joint_thresholds:
            grid.append({"detection_threshold": threshold, "joint_threshold": joint,
                         **summary(rescored(run, VAL, joint))})
            print(f"val: detection {threshold}, joints {joint}: MOTA {grid[-1]['mota']:.1f}", flush=True)
    best = max(grid, key=lambda g: (round(g["mota"], 6), -g["detection_threshold"], -g["joint_threshold"]))
    chosen = {"detection_threshold": best["detection_threshold"], "joint_threshold": best["joint_threshold"]}
    appearance = []
    for weight in args.appearance_weights:
        run = out / (f"val-det{chosen['detection_threshold']}" + (f"-app{weight}" if weight else ""))   # 0: run above
        tracked(dataclasses.replace(base, data=VAL, appearance_weight=weight, run_dir=str(run),
                                    detection_threshold=chosen["detection_threshold"]))
        appearance.append({"appearance_weight": weight, **summary(rescored(run, VAL, chosen["joint_threshold"]))})
        print(f"val: appearance {weight}: MOTA {appearance[-1]['mota']:.1f}", flush=True)
    chosen["appearance_weight"] = max(appearance, key=lambda g: (round(g["mota"], 6), -g["appearance_weight"]))[
        "appearance_weight"]
    flows = []
    for flow in ("dis", "none"):   # dis: the runs above
        run = out / (f"val-det{chosen['detection_threshold']}" + (f"-app{chosen['appearance_weight']}"
                     if chosen["appearance_weight"] else "") + ("" if flow == "dis" else f"-flow{flow}"))
        tracked(dataclasses.replace(base, data=VAL, flow=flow, run_dir=str(run), **chosen))
        flows.append({"flow": flow, **summary(rescored(run, VAL, chosen["joint_threshold"]))})
        print(f"val: flow {flow}: MOTA {flows[-1]['mota']:.1f}", flush=True)
    chosen["flow"] = max(flows, key=lambda g: round(g["mota"], 6))["flow"]   # ties: dis, tried first
    print(f"chosen on {VAL}: {chosen}", flush=True)

    # the table on the test splits
    rows = []
    for data in TESTS:
        box = evaluate_detector(detector, data, device=args.device)
        for pose_name, pose in (("source", args.pose_source), ("mean teacher", args.pose_adapted)):
            for flow in ("none", "dis"):
                domain = data.split("/")[1].split(":")[0]
                run = out / f"test-{domain}-{'adapted' if pose == args.pose_adapted else 'source'}-{flow}"
                m = tracked(dataclasses.replace(base, data=data, pose=pose, run_dir=str(run), video=flow == "dis",
                                                **{**chosen, "flow": flow}))
                rows.append({"data": data, "pose": pose_name, "flow": flow, "box_ap": box["ap"], **summary(m),
                             "frames_per_second": m["frames_per_second"]})
                print(f"{data} {pose_name} flow {flow}: MOTA {m['mota']:.1f}", flush=True)
    results = {"chosen_on_val": chosen, "val_grid": grid, "val_appearance": appearance, "val_flow": flows,
               "test": rows,
               "detector": str(detector)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(rows, chosen))
    print(table(rows, chosen))


def summary(m: dict) -> dict:
    return {k: m[k] for k in ("mota", "motp", "ap", "precision", "recall", "id_switches")}


def table(rows: list[dict], chosen: dict) -> str:
    lines = [f"Settings chosen on {VAL}: {chosen}", "",
             "| data | detector box AP | pose model | flow | MOTA | MOTP | AP | precision | recall | ID switches "
             "| frames/s |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['box_ap']:.1f} | {r['pose']} | {r['flow']} | {r['mota']:.1f} | "
                     f"{r['motp']:.1f} | {r['ap']:.1f} | {r['precision']:.1f} | {r['recall']:.1f} | "
                     f"{r['id_switches']} | {r['frames_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
