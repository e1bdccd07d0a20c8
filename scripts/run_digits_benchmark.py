#!/usr/bin/env python
"""Source-only, SHOT-IM, SHOT and SHOT++ on every ordered pair of the built-in digits domains.

This is the `digits` preset: SHOT's own digits protocol, kept so that the table compares with the
official code. For each seed: train one source model per domain on its published train split
(`trainval`) and keep the best check on its TEST split, as the official digit code does (every other
source in the workbench selects on a val split), then adapt it to each other domain's train split with each method. Two accuracies per
run: on the target's test split after adapting (`test_accuracy`, the official digits protocol)
and on the target's train split that was adapted on (`accuracy`, transductive). Finished runs (a
metrics.json in their directory) are skipped, so the script can be stopped and started again.
Writes results.jsonl and markdown tables (table.md) to the output folder.

    python scripts/run_digits_benchmark.py --seeds 0 1 2 --out runs/digits-benchmark
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.digits import DOMAINS  # noqa: E402
from adaptation.classification.evaluate import evaluate_model  # noqa: E402
from adaptation.classification.shot import METHODS, AdaptConfig, ShotAdapter  # noqa: E402
from adaptation.classification.source import SourceConfig, train_source  # noqa: E402
from workbench.logging import mean_sd  # noqa: E402

SHOT_DIGITS_SELECTION = "builtin:digits/{}:test"  # the official digits protocol selects the source on test


def source_model(out: Path, domain: str, seed: int, backbone: str, epochs: int | None) -> Path:
    run = out / f"source-{domain}-s{seed}"
    if not (run / "metrics.json").exists():
        cfg = SourceConfig(data=f"builtin:digits/{domain}:trainval", select_on=SHOT_DIGITS_SELECTION.format(domain),
                           backbone=backbone, seed=seed, run_dir=str(run), progress=False)
        if epochs is not None:
            cfg.epochs = epochs
        train_source(cfg)
    return run


def adapted(out: Path, source: Path, target: str, method: str, seed: int, epochs: int | None) -> dict:
    run = out / f"{source.name.split('-')[1]}-to-{target}-{method}-s{seed}"
    if not (run / "metrics.json").exists():
        ShotAdapter(AdaptConfig(source=str(source), target=f"builtin:digits/{target}", method=method, seed=seed,
                                epochs=epochs, run_dir=str(run), progress=False)).run()
    return json.loads((run / "metrics.json").read_text())


def table(rows: list[dict], methods: list[str], key: str = "test_accuracy") -> str:
    cols = ["source-only", *methods]
    lines = ["| pair | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    pairs = sorted({(r["source"], r["target"]) for r in rows})
    means = {c: [] for c in cols}
    for s, t in pairs:
        cells = []
        for c in cols:
            accs = [r[key] for r in rows if (r["source"], r["target"], r["method"]) == (s, t, c)]
            if accs:
                means[c].append(statistics.mean(accs))
                cells.append(mean_sd(accs, count=True))
            else:
                cells.append("—")
        lines.append(f"| {s} → {t} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{statistics.mean(v):.1f}" if len(v) == len(pairs) else "—"
                                         for v in means.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--backbone", default="dtn")
    p.add_argument("--source-epochs", type=int, default=None, help="default: 30 (the paper's digits setting)")
    p.add_argument("--epochs", type=int, default=None, help="adaptation epochs; default: 30 (paper, digits)")
    p.add_argument("--pairs", nargs="+", default=None, metavar="SOURCE:TARGET",
                   help="only these ordered pairs, e.g. uci:photo fonts:uci (default: all six)")
    p.add_argument("--out", default="runs/digits-benchmark")
    args = p.parse_args(argv)
    pairs = list(itertools.permutations(DOMAINS, 2))
    if args.pairs:
        wanted = [tuple(pair.split(":")) for pair in args.pairs]
        unknown = [":".join(pair) for pair in wanted if pair not in pairs]
        if unknown:
            p.error(f"unknown pair(s) {', '.join(unknown)}: use SOURCE:TARGET with two of {', '.join(DOMAINS)}")
        pairs = [pair for pair in pairs if pair in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"   # rows of earlier calls (other seeds, pairs, methods) are kept
    rows = {row_key(r): r for r in map(json.loads, results.read_text().splitlines())} if results.exists() else {}

    def record(row: dict) -> None:
        rows[row_key(row)] = row
        report(row)
        results.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
        (out / "table.md").write_text(tables(list(rows.values())))

    # First seed: every method. Further seeds: each method over all of them before the next, SHOT++
    # (the costliest) last. A stopped run so leaves whole columns, and as many seeds as it reached.
    order = [(args.seeds[0], m) for m in args.methods] + [(s, m) for m in args.methods for s in args.seeds[1:]]
    for seed, method in order:
        for source, target in pairs:
            src = source_model(out, source, seed, args.backbone, args.source_epochs)
            if method == args.methods[0]:
                accs = {key: evaluate_model(src, f"builtin:digits/{target}:{split}")["accuracy"]
                        for key, split in (("test_accuracy", "test"), ("accuracy", "train"))}
                record({"source": source, "target": target, "method": "source-only", "seed": seed, **accs})
            metrics = adapted(out, src, target, method, seed, args.epochs)
            record({"source": source, "target": target, "method": method, "seed": seed,
                    "test_accuracy": metrics["test_accuracy"], "accuracy": metrics["accuracy"]})
    print(tables(list(rows.values())))


def row_key(row: dict) -> tuple:
    return row["source"], row["target"], row["method"], row["seed"]


def report(row: dict) -> None:
    print(f"seed {row['seed']} {row['source']} -> {row['target']} {row['method']}: test {row['test_accuracy']:.1f}, "
          f"adapted split {row['accuracy']:.1f}", flush=True)


def tables(rows: list[dict]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    return ("Accuracy (%) on the target's test split\n\n" + table(rows, methods, "test_accuracy")
            + "\n\nAccuracy (%) on the target's train split, the data adapted on (transductive)\n\n"
            + table(rows, methods, "accuracy") + "\n")


if __name__ == "__main__":
    main()
