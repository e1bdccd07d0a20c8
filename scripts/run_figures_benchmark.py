#!/usr/bin/env python
"""Pose on the built-in figures pair: source-only and mean-teacher PCK and OKS AP, several seeds.

For each seed: train a pose source model on `flat` (train split, the checkpoint selected by AP on
the flat val split), score it on the flat test split (in-domain) and on the `textured` test split
(source-only), adapt it to the textured train split with the mean teacher (no selection: the final
teacher) and score the adapted model on the textured test split. Every reported number is a test
split's; val only selects. Finished runs (a metrics.json in their directory) are skipped, so the
script can be stopped and started again; a folder made with other settings (e.g. selected on test,
before val existed) is refused. Writes results.jsonl and a markdown table (table.md) to the output
folder.

    python scripts/run_figures_benchmark.py --seeds 0 1 2 --out runs/figures-benchmark

Defaults sized for a CPU: ResNet-18 + deconv at width 128 (published 256), 60 source epochs and 5
mean-teacher epochs (the configs' own defaults are 30 and 10). From scratch the source needs the 60:
after 15 it scored PCK@0.1 38 on flat:test, after 60 97 (seed 0, selected on flat:test before val
existed, docs/RESULTS.md); 60 epochs take
about 50 min on one CPU thread under bf16. Training and adaptation run under bf16 autocast where
the hardware computes it (`--precision auto`; fp32 elsewhere or with `--precision fp32`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.pose.mean_teacher import PoseAdaptConfig, PoseMeanTeacher  # noqa: E402
from adaptation.pose.source import PoseSourceConfig, train_pose_source  # noqa: E402
from workbench.logging import finished_or_trained, seed_table  # noqa: E402

SOURCE, TARGET = "builtin:figures/flat", "builtin:figures/textured"
SELECT_ON, IN_DOMAIN_TEST, TARGET_TEST = f"{SOURCE}:val", f"{SOURCE}:test", f"{TARGET}:test"
METRICS = ("pck@0.05", "pck@0.1", "ap")
COLUMNS = ("in-domain", "source-only", "mean-teacher")


def source_model(out: Path, seed: int, args) -> dict:
    run = out / f"source-s{seed}"
    cfg = PoseSourceConfig(data=SOURCE, backbone=args.backbone, head=args.head, head_channels=args.head_channels,
                           epochs=args.source_epochs, select_on=SELECT_ON, test_on=IN_DOMAIN_TEST,
                           eval_target=TARGET_TEST, precision=args.precision,
                           seed=seed, run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: train_pose_source(cfg))


def adapted(out: Path, seed: int, args) -> dict:
    run = out / f"mean-teacher-s{seed}"
    cfg = PoseAdaptConfig(source=str(out / f"source-s{seed}"), target=TARGET, epochs=args.epochs,
                          test_on=TARGET_TEST, precision=args.precision, seed=seed, run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: PoseMeanTeacher(cfg).run())


def table(rows: list[dict]) -> str:
    """Metrics as lines, the three columns as cells: mean ± sd over the seeds run."""
    cells = [{"metric": metric, "column": r["column"], "value": r[metric]} for r in rows for metric in METRICS]
    return seed_table(cells, "metric", COLUMNS, "value", order=METRICS)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--head", default="deconv")
    p.add_argument("--head-channels", type=int, default=128, help="deconv width (published: 256)")
    p.add_argument("--source-epochs", type=int, default=60, help="source epochs (PoseSourceConfig: 30)")
    p.add_argument("--epochs", type=int, default=5, help="adaptation epochs (PoseAdaptConfig: 10)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="source training and "
                   "adaptation (default auto: bf16 autocast where the CPU or GPU computes it natively, 3x faster "
                   "on AMX CPUs)")
    p.add_argument("--out", default="runs/figures-benchmark")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        src = source_model(out, seed, args)
        mt = adapted(out, seed, args)
        rows += [{"seed": seed, "column": "in-domain", **{m: src["test"][m] for m in METRICS}},
                 {"seed": seed, "column": "source-only", **{m: mt[f"source_only_test_{m}"] for m in METRICS}},
                 {"seed": seed, "column": "mean-teacher", **{m: mt[f"test_{m}"] for m in METRICS}}]
        print(f"seed {seed}: " + "; ".join(f"{r['column']} " + ", ".join(f"{m} {r[m]:.1f}" for m in METRICS)
                                          for r in rows if r["seed"] == seed), flush=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "table.md").write_text(report(rows, args))
    print(report(rows, args))


def report(rows: list[dict], args) -> str:
    seeds = len({r["seed"] for r in rows})
    return (f"Pose on {SOURCE} -> {TARGET} ({TARGET_TEST}; in-domain: {IN_DOMAIN_TEST}; source checkpoint "
            f"selected on {SELECT_ON}), {args.backbone}+{args.head} "
            f"(width {args.head_channels}), "
            f"source {args.source_epochs} epochs, mean teacher {args.epochs} epochs, precision {args.precision}, "
            f"{seeds} seed(s); PCK and AP in %"
            f"\n\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
