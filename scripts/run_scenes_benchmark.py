#!/usr/bin/env python
"""Every segmentation head on the built-in scenes pair: source-only and adapted target mIoU.

For each seed and head: train a source model on `printed` (train split, the checkpoint selected by
mIoU on the printed VAL split), score it on the printed and textured TEST splits (in-domain and
source-only), then adapt it to the textured train split with each method and score the adapted model
on the textured test split. Nothing is chosen on a test split: table.md (results.jsonl) reports test
only; val-table.md (val-results.jsonl) holds the same runs scored on the val splits (printed:val for
the sources' selection, textured:val for the adapted models), the table to choose settings such as
the diversity prior on. It is not a result.

Columns are named by what runs (adaptation.segmentation.shot.method_name), not by the --methods selector:
with the default source prior (`--diversity-priors initial`) `shot-im` runs "im (source prior)" and
`shot` runs "im (source prior) + centroid labels"; only `--diversity-priors uniform` gives SHOT-IM
("shot-im") and SHOT ("shot"). `--pseudo-labels centroid balanced` adds a column with URMA's
class-balanced confident predictions in place of SHOT's centroid pseudo-labels ("... + balanced labels").
The choice between the priors on val, one seed and one head (a 32-epoch source, then two 5-epoch
adaptations):

    python scripts/run_scenes_benchmark.py --seeds 0 --heads fcn --methods shot-im \
        --diversity-priors initial uniform --out runs/scenes-prior-val      # then read val-table.md

Finished runs (a metrics.json in their directory) are skipped, so the script can be stopped and
started again; a folder holding runs made with other settings (sources selected on printed:test by
the code before the val split) is refused with a clear error: use a new --out. `--report-only`
writes the tables from the runs finished so far and trains nothing.

    python scripts/run_scenes_benchmark.py --seeds 0 1 2 --out runs/scenes-benchmark-val

Defaults sized for a CPU: the DTN of the digits experiments at output stride 4 with 64-channel
heads, trained from scratch with Adam (2e-3, poly) for 32 epochs (6,000 iterations, about 17 min on
one CPU thread under bf16; SGD at the papers' 0.01 leaves from-scratch models at all-background far
longer), and 5 adaptation epochs. Shorter source training leaves models too uncertain to adapt:
dtn + fcn (the one-conv fcn head of before issue 34) reached 29 mIoU on printed:test / 18 on
textured:test after 8 epochs and 80 / 45 after 32 (seed 0, sources then selected on printed:test,
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

from workbench.heads import list_heads  # noqa: E402
from adaptation.segmentation.shot import (DIVERSITY_PRIORS, METHODS, PSEUDO_LABELS, DenseAdaptConfig,  # noqa: E402
                                   DenseShotAdapter, method_name)
from adaptation.segmentation.source import DenseSourceConfig, train_dense_source  # noqa: E402
from workbench.logging import finished_or_trained, seed_table  # noqa: E402

SOURCE, TARGET = "builtin:scenes/printed", "builtin:scenes/textured"
REPORTED, CHOSEN_ON = "test", "val"   # figures are reported on test; checkpoints and settings are chosen on val


def method_column(method: str, prior: str, pseudo: str = DenseAdaptConfig.pseudo_labels) -> str:
    """A table column per method, IM diversity prior and pseudo-label rule: the name of what runs."""
    return method_name(method, prior, pseudo)


def run_name(head: str, method: str, prior: str, pseudo: str, seed: int) -> str:
    """The run folder: every setting spelled out (pseudo-label rules only for SHOT), no spaces."""
    return "-".join([head, method, prior, *([pseudo] if method == "shot" else []), f"s{seed}"])


def variants(args) -> list[tuple[str, str, str]]:
    """(method, prior, pseudo-labels) of every adapted column; pseudo-label rules apply to SHOT only."""
    return [(m, prior, pseudo) for m in args.methods for prior in args.diversity_priors
            for pseudo in (args.pseudo_labels if m == "shot" else [DenseAdaptConfig.pseudo_labels])]


def source_model(out: Path, head: str, seed: int, args) -> dict | None:
    run = out / f"source-{head}-s{seed}"
    cfg = DenseSourceConfig(data=SOURCE, backbone=args.backbone, head=head, head_channels=args.head_channels,
                            optimizer=args.optimizer, epochs=args.source_epochs, select_on=f"{SOURCE}:{CHOSEN_ON}",
                            eval_target=f"{TARGET}:{REPORTED}", precision=args.precision, seed=seed,
                            run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: train_dense_source(cfg), not args.report_only)


def adapted(out: Path, head: str, method: str, prior: str, pseudo: str, seed: int, args) -> dict | None:
    run = out / run_name(head, method, prior, pseudo, seed)
    cfg = DenseAdaptConfig(source=str(out / f"source-{head}-s{seed}"), target=TARGET, method=method, seed=seed,
                           epochs=args.epochs, diversity_prior=prior, pseudo_labels=pseudo,
                           test_on=f"{TARGET}:{REPORTED}", val_on=f"{TARGET}:{CHOSEN_ON}",
                           precision=args.precision, run_dir=str(run), progress=False)
    return finished_or_trained(run, cfg, lambda: DenseShotAdapter(cfg).run(), not args.report_only)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heads", nargs="+", default=list_heads("segmentation"), choices=list_heads("segmentation"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="loss selectors: shot-im "
                   "(IM alone) and shot (IM + pseudo-labels); the columns are named by what runs (see above)")
    p.add_argument("--diversity-priors", nargs="+", default=[DenseAdaptConfig.diversity_prior],
                   choices=DIVERSITY_PRIORS, help="IM diversity prior(s), each a column per method: initial (the "
                   "default: the source model's mean pixel prediction on the target, 'im (source prior)') or uniform "
                   "(SHOT-IM's and SHOT's); see adaptation/segmentation/shot.py")
    p.add_argument("--pseudo-labels", nargs="+", default=[DenseAdaptConfig.pseudo_labels], choices=PSEUDO_LABELS,
                   help="SHOT pseudo-label rule(s), each a column: centroid (SHOT's, the default) or balanced "
                   "(URMA's class-balanced confident predictions)")
    p.add_argument("--backbone", default="dtn")
    p.add_argument("--head-channels", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="source training (default adam)")
    p.add_argument("--source-epochs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="adaptation epochs (SHOT's own default is 15)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="source training and "
                   "adaptation (default auto: bf16 autocast where the CPU or GPU computes it natively, 3x faster "
                   "on AMX CPUs)")
    p.add_argument("--out", default="runs/scenes-benchmark-val")
    p.add_argument("--report-only", action="store_true", help="train nothing: the tables of the runs already "
                   "finished in --out (for example while other processes are still filling it)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, val_rows = [], []
    for seed in args.seeds:  # seed-major: a stopped run leaves every head at as many seeds as it reached
        for head in args.heads:
            src = source_model(out, head, seed, args)
            if src is None:   # --report-only, and this source is not finished
                continue
            key = {"head": head, "seed": seed}
            rows += [{**key, "column": "in-domain", "miou": src["test"]["miou"], "data": src["test"]["data"]},
                     {**key, "column": "source-only", "miou": src["target"]["miou"], "data": src["target"]["data"]}]
            val_rows.append({**key, "column": "in-domain", "miou": src["miou"], "data": src["selection_data"]})
            for method, prior, pseudo in variants(args):
                run = adapted(out, head, method, prior, pseudo, seed, args)
                if run is None:
                    continue
                column = method_column(method, prior, pseudo)
                rows.append({**key, "column": column, "miou": run["test_miou"], "data": run["test_data"]})
                if not any(r["column"] == "source-only" and r["head"] == head and r["seed"] == seed for r in val_rows):
                    val_rows.append({**key, "column": "source-only", "miou": run["source_only_val_miou"],
                                     "data": run["val_data"]})
                val_rows.append({**key, "column": column, "miou": run["val_miou"], "data": run["val_data"]})
            print(f"seed {seed} {head}, {TARGET}:{REPORTED}: " + ", ".join(
                f"{r['column']} {r['miou']:.1f}" for r in rows if (r["head"], r["seed"]) == (head, seed)), flush=True)
            write_tables(out, rows, val_rows, args)
    write_tables(out, rows, val_rows, args)
    print(report(rows, args))


def write_tables(out: Path, rows: list[dict], val_rows: list[dict], args) -> None:
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "table.md").write_text(report(rows, args))
    (out / "val-results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    (out / "val-table.md").write_text(report(val_rows, args, CHOSEN_ON))


def report(rows: list[dict], args, split: str = REPORTED) -> str:
    if split == REPORTED:
        title = (f"mIoU (%) on {TARGET}:{REPORTED} (in-domain: {SOURCE}:{REPORTED}); source checkpoints selected "
                 f"on {SOURCE}:{CHOSEN_ON}")
    else:
        title = (f"FOR CHOOSING SETTINGS, NOT A RESULT (report table.md): mIoU (%) on {TARGET}:{CHOSEN_ON} "
                 f"(in-domain: {SOURCE}:{CHOSEN_ON}, the sources' selection score)")
    return (f"{title}; backbone {args.backbone}, head width {args.head_channels}, source {args.optimizer} x "
            f"{args.source_epochs} epochs, adaptation {args.epochs} epochs, precision {args.precision}; mean ± sd over "
            f"the seeds finished (n) per cell\n\n" + seed_table(rows, "head", columns(args), "miou") + "\n")


def columns(args) -> list[str]:
    return ["in-domain", "source-only", *(method_column(*v) for v in variants(args))]


if __name__ == "__main__":
    main()
