#!/usr/bin/env python
"""Every method and setting on every ordered pair of the built-in digits domains.

This is the `digits` preset: SHOT's own digits protocol, kept so that the table compares with the
official code. For each seed: train one source model per domain on its published train split
(`trainval`) and keep the best check on its TEST split, as the official digit code does (every other
source in the workbench selects on a val split), then adapt it to each other domain's train split with
each method. Two accuracies per run: on the target's test split after adapting (`test_accuracy`, the
official digits protocol) and on the target's train split that was adapted on (`accuracy`,
transductive).

Settings (`--settings`): `closed` runs every `--methods` entry (SHOT-IM, SHOT, SHOT++, NRC, AaD);
`partial` runs SHOT's partial-set rule from the same source models to targets that keep the digits
PARTIAL_CLASSES; `open` trains a second source per domain on the KNOWN_CLASSES only and runs SHOT's
open-set rule to the full target, reported as OS*, OS, UNK and the H-score. Finished runs (a
metrics.json in their directory) are skipped, so the script can be stopped and started again. Writes
results.jsonl and markdown tables (table.md) to the output folder.

    python scripts/run_digits_benchmark.py --seeds 0 1 2 --out runs/digits-benchmark
    python scripts/run_digits_benchmark.py --seeds 0 --methods shot-im shot nrc aad \
        --settings closed partial open --out runs/digits-cpu
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
from adaptation.classification.open_set import KNOWN_CLASSES, PARTIAL_CLASSES, SETTINGS  # noqa: E402
from adaptation.classification.neighbourhood import create_adapter  # noqa: E402
from adaptation.classification.shot import METHODS, AdaptConfig  # noqa: E402
from adaptation.classification.source import SourceConfig, train_source  # noqa: E402
from workbench.files import atomic_write  # noqa: E402
from workbench.logging import mean_sd  # noqa: E402

SHOT_DIGITS_SELECTION = "builtin:digits/{}:test"  # the official digits protocol selects the source on test
SETTING_METHOD = "shot"                           # the partial-set and open-set rules are SHOT's
OPEN_SET_SCORES = (("os_star", "OS*"), ("os", "OS"), ("unknown", "UNK"), ("h_score", "H"))


def source_model(out: Path, domain: str, seed: int, backbone: str, epochs: int | None,
                 known_only: bool = False) -> Path:
    """The seed's source model of a domain (trained once, shared by every method); `known_only`: the
    open-set source, trained on KNOWN_CLASSES."""
    run = out / f"source-{domain}-s{seed}" if not known_only else out / f"known-source-{domain}-s{seed}"
    if not (run / "metrics.json").exists():
        cfg = SourceConfig(data=f"builtin:digits/{domain}:trainval", select_on=SHOT_DIGITS_SELECTION.format(domain),
                           backbone=backbone, seed=seed, run_dir=str(run), progress=False,
                           classes=KNOWN_CLASSES if known_only else None)
        if epochs is not None:
            cfg.epochs = epochs
        train_source(cfg)
    return run


def adapted(out: Path, source: Path, domain: str, target: str, method: str, seed: int, epochs: int | None,
            setting: str = "closed") -> dict:
    run = out / f"{domain}-to-{target}-{method if setting == 'closed' else setting}-s{seed}"
    if not (run / "metrics.json").exists():
        create_adapter(AdaptConfig(source=str(source), target=f"builtin:digits/{target}", method=method, seed=seed,
                                   epochs=epochs, run_dir=str(run), progress=False, setting=setting)).run()
    return json.loads((run / "metrics.json").read_text())


def setting_rows(metrics: dict, base: dict) -> list[dict]:
    """A partial-set or open-set run's two rows: the source model's scores (before adapting, in the
    same setting) and SHOT's."""
    rows = []
    for method, prefix, open_keys in (("source-only", "source_only_", ("source_only_test", "source_only")),
                                      (SETTING_METHOD, "", ("adapted_test", "adapted"))):
        row = {**base, "method": method, "test_accuracy": metrics[f"{prefix}test_accuracy"],
               "accuracy": metrics[f"{prefix}accuracy"]}
        if "open_set" in metrics:
            row["open_set_test"], row["open_set"] = (metrics["open_set"][k] for k in open_keys)
        rows.append(row)
    return rows


def cell(values: list[float], means: list[float]) -> str:
    if not values:
        return "—"
    means.append(statistics.mean(values))
    return mean_sd(values, count=True)


def mean_row(means: dict[str, list[float]], pairs: int) -> str:
    return "| mean | " + " | ".join(f"{statistics.mean(v):.1f}" if len(v) == pairs else "—"
                                   for v in means.values()) + " |"


def table(rows: list[dict], methods: list[str], key: str = "test_accuracy") -> str:
    cols = ["source-only", *methods]
    lines = ["| pair | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    pairs = sorted({(r["source"], r["target"]) for r in rows})
    means = {c: [] for c in cols}
    for s, t in pairs:
        cells = [cell([r[key] for r in rows if (r["source"], r["target"], r["method"]) == (s, t, c)], means[c])
                 for c in cols]
        lines.append(f"| {s} → {t} | " + " | ".join(cells) + " |")
    lines.append(mean_row(means, len(pairs)))
    return "\n".join(lines)


def open_set_table(rows: list[dict], key: str = "open_set_test") -> str:
    """OS*, OS, UNK and H of the known-class source and of SHOT's open-set rule, per pair."""
    cols = [(m, score, f"{'source' if m == 'source-only' else 'SHOT'} {label}")
            for m in ("source-only", SETTING_METHOD) for score, label in OPEN_SET_SCORES]
    lines = ["| pair | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    pairs = sorted({(r["source"], r["target"]) for r in rows})
    means = {c[2]: [] for c in cols}
    for s, t in pairs:
        cells = [cell([r[key][score] for r in rows if (r["source"], r["target"], r["method"]) == (s, t, m)],
                      means[label]) for m, score, label in cols]
        lines.append(f"| {s} → {t} | " + " | ".join(cells) + " |")
    lines.append(mean_row(means, len(pairs)))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="closed-set methods (default: all)")
    p.add_argument("--settings", nargs="+", default=["closed"], choices=SETTINGS,
                   help="closed: every --methods entry; partial and open: SHOT's rules (default: closed)")
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
        # atomic: a run stopped while writing keeps the previous file, which the next call reads back
        text = "".join(json.dumps(r) + "\n" for r in rows.values())
        atomic_write(results, lambda f: f.write(text.encode()))
        (out / "table.md").write_text(tables(list(rows.values())))

    # First seed: every job. Further seeds: each job over all of them before the next, the costliest
    # (SHOT++) where the user put it. A stopped run so leaves whole columns, and as many seeds as it reached.
    jobs = ([("closed", m) for m in args.methods] if "closed" in args.settings else []) + \
           [(setting, SETTING_METHOD) for setting in args.settings if setting != "closed"]
    order = [(args.seeds[0], *job) for job in jobs] + [(s, *job) for job in jobs for s in args.seeds[1:]]
    for seed, setting, method in order:
        for source, target in pairs:
            base = {"source": source, "target": target, "setting": setting, "seed": seed}
            src = source_model(out, source, seed, args.backbone, args.source_epochs, known_only=setting == "open")
            metrics = adapted(out, src, source, target, method, seed, args.epochs, setting)
            if setting != "closed":
                for row in setting_rows(metrics, base):
                    record(row)
                continue
            if not any(row_key(r) == (source, target, "source-only", "closed", seed) for r in rows.values()):
                accs = {key: evaluate_model(src, f"builtin:digits/{target}:{split}")["accuracy"]
                        for key, split in (("test_accuracy", "test"), ("accuracy", "train"))}
                record({**base, "method": "source-only", **accs})
            record({**base, "method": method, "test_accuracy": metrics["test_accuracy"],
                    "accuracy": metrics["accuracy"]})
    print(tables(list(rows.values())))


def row_key(row: dict) -> tuple:
    return row["source"], row["target"], row["method"], row.get("setting", "closed"), row["seed"]


def report(row: dict) -> None:
    print(f"seed {row['seed']} {row['source']} -> {row['target']} {row.get('setting', 'closed')} {row['method']}: "
          f"test {row['test_accuracy']:.1f}, adapted split {row['accuracy']:.1f}", flush=True)


def tables(rows: list[dict]) -> str:
    parts = []
    for setting in SETTINGS:
        chosen = [r for r in rows if r.get("setting", "closed") == setting]
        if not chosen:
            continue
        methods = [m for m in METHODS if any(r["method"] == m for r in chosen)]
        title = {"closed": "Closed set", "partial": f"Partial set (target classes {PARTIAL_CLASSES})",
                 "open": f"Open set (known classes {KNOWN_CLASSES}, the rest unknown)"}[setting]
        parts.append(f"## {title}\n\nAccuracy (%) on the target's test split\n\n" + table(chosen, methods)
                     + "\n\nAccuracy (%) on the target's train split, the data adapted on (transductive)\n\n"
                     + table(chosen, methods, "accuracy"))
        if setting == "open":
            parts.append("Open-set scores (%) on the target's test split\n\n" + open_set_table(chosen))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
