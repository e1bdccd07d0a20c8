#!/usr/bin/env python
"""Every segmentation head on the built-in scenes pair: source-only, SHOT-IM and SHOT target mIoU.

For each seed and head: train a source model on `printed` (train split, selected by mIoU on the
printed test split), score it on the `textured` test split (source-only), then adapt it to the
textured train split with each method and score the adapted model on the textured test split.
`--diversity-priors initial uniform` adds a column per method with SHOT's own IM diversity term, pulled
towards uniform class proportions instead of the source model's initial ones (`<method>+uniform`), and
`--pseudo-labels centroid balanced` a SHOT column with URMA's class-balanced confident predictions in place
of SHOT's centroid pseudo-labels (`shot+balanced`).
Finished runs (a metrics.json in their directory) are skipped, so the script can be stopped and
started again. Writes results.jsonl and a markdown table (table.md) to the output folder;
`--report-only` writes them from the runs finished so far and trains nothing.

    python scripts/run_scenes_benchmark.py --seeds 0 1 2 --out runs/scenes-benchmark

Defaults sized for a CPU: the DTN of the digits experiments at output stride 4 with 64-channel
heads, trained from scratch with Adam (2e-3, poly) for 32 epochs (6,000 iterations, about 17 min on
one CPU thread under bf16; SGD at the papers' 0.01 leaves from-scratch models at all-background far
longer), and 5 adaptation epochs. Shorter source training leaves models too uncertain to adapt:
dtn + fcn reached 29 mIoU in-domain / 18 on the target after 8 epochs and 80 / 45 after 32 (seed 0,
docs/RESULTS.md), and SHOT-IM lowered both sources' target mIoU.
Training and adaptation run under bf16 autocast where the hardware computes it (`--precision auto`;
fp32 elsewhere or with `--precision fp32`).
`--backbone resnet18 --head-channels 512 --optimizer sgd --epochs 15` gives the papers' widths,
optimiser and adaptation length for a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.dense.heads import list_heads  # noqa: E402
from adaptation.dense.shot import (DIVERSITY_PRIORS, METHODS, PSEUDO_LABELS, DenseAdaptConfig,  # noqa: E402
                                   DenseShotAdapter)
from adaptation.dense.source import DenseSourceConfig, train_dense_source  # noqa: E402
from workbench.logging import finished_or_trained, seed_table  # noqa: E402

SOURCE, TARGET = "builtin:scenes/printed", "builtin:scenes/textured"


def method_column(method: str, prior: str, pseudo: str = DenseAdaptConfig.pseudo_labels) -> str:
    """A table column (and run-name part) per method, IM diversity prior and pseudo-label rule; defaults are bare."""
    return "+".join([method, *(v for v, d in ((prior, DenseAdaptConfig.diversity_prior),
                                               (pseudo, DenseAdaptConfig.pseudo_labels)) if v != d)])


def variants(args) -> list[tuple[str, str, str]]:
    """(method, prior, pseudo-labels) of every adapted column; pseudo-label rules apply to SHOT only."""
    return [(m, prior, pseudo) for m in args.methods for prior in args.diversity_priors
            for pseudo in (args.pseudo_labels if m == "shot" else [DenseAdaptConfig.pseudo_labels])]


def source_model(out: Path, head: str, seed: int, args) -> dict | None:
    run = out / f"source-{head}-s{seed}"
    cfg = DenseSourceConfig(data=SOURCE, backbone=args.backbone, head=head, head_channels=args.head_channels,
                            optimizer=args.optimizer, epochs=args.source_epochs, eval_target=f"{TARGET}:test",
                            precision=args.precision, seed=seed, run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: train_dense_source(cfg), not args.report_only)


def adapted(out: Path, head: str, method: str, prior: str, pseudo: str, seed: int, args) -> dict | None:
    run = out / f"{head}-{method_column(method, prior, pseudo)}-s{seed}"
    cfg = DenseAdaptConfig(source=str(out / f"source-{head}-s{seed}"), target=TARGET, method=method, seed=seed,
                           epochs=args.epochs, diversity_prior=prior, pseudo_labels=pseudo,
                           precision=args.precision, run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: DenseShotAdapter(cfg).run(), not args.report_only)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heads", nargs="+", default=list_heads("segmentation"), choices=list_heads("segmentation"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--diversity-priors", nargs="+", default=[DenseAdaptConfig.diversity_prior],
                   choices=DIVERSITY_PRIORS, help="IM diversity prior(s), each a column per method: initial (the "
                   "default: the source model's mean pixel prediction on the target) or uniform (SHOT's); see "
                   "adaptation/dense/shot.py")
    p.add_argument("--pseudo-labels", nargs="+", default=[DenseAdaptConfig.pseudo_labels], choices=PSEUDO_LABELS,
                   help="SHOT pseudo-label rule(s), each a SHOT column: centroid (SHOT's, the default) or balanced "
                   "(URMA's class-balanced confident predictions)")
    p.add_argument("--backbone", default="dtn")
    p.add_argument("--head-channels", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="source training (default adam)")
    p.add_argument("--source-epochs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="adaptation epochs (SHOT's own default is 15)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="source training and "
                   "adaptation (default auto: bf16 autocast where the CPU or GPU computes it natively, 3x faster "
                   "on AMX CPUs)")
    p.add_argument("--out", default="runs/scenes-benchmark")
    p.add_argument("--report-only", action="store_true", help="train nothing: the table of the runs already "
                   "finished in --out (for example while other processes are still filling it)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seed-major: a stopped run leaves every head at as many seeds as it reached
        for head in args.heads:
            src = source_model(out, head, seed, args)
            if src is None:   # --report-only, and this source is not finished
                continue
            rows += [{"head": head, "seed": seed, "column": "in-domain", "miou": src["miou"]},
                     {"head": head, "seed": seed, "column": "source-only", "miou": src["target"]["miou"]}]
            for method, prior, pseudo in variants(args):
                run = adapted(out, head, method, prior, pseudo, seed, args)
                if run is not None:
                    rows.append({"head": head, "seed": seed, "column": method_column(method, prior, pseudo),
                                 "miou": run["test_miou"]})
            print(f"seed {seed} {head}: " + ", ".join(f"{r['column']} {r['miou']:.1f}" for r in rows
                                                      if (r["head"], r["seed"]) == (head, seed)), flush=True)
            (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "table.md").write_text(report(rows, args))
    print(report(rows, args))


def report(rows: list[dict], args) -> str:
    return (f"mIoU (%) on {TARGET}:test (in-domain: {SOURCE}:test), backbone {args.backbone}, head width "
            f"{args.head_channels}, source {args.optimizer} x {args.source_epochs} epochs, adaptation {args.epochs} "
            f"epochs, precision {args.precision}; mean ± sd over the seeds finished (n) per cell\n\n"
            + seed_table(rows, "head", columns(args), "miou") + "\n")


def columns(args) -> list[str]:
    return ["in-domain", "source-only", *(method_column(*v) for v in variants(args))]


if __name__ == "__main__":
    main()
