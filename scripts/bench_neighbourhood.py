#!/usr/bin/env python
"""Time one adaptation epoch of NRC and AaD against SHOT's on the same data, in one process.

Each method adapts the same source model for `--epochs` epochs, alternating methods `--repeats` times so that
a slower or busier stretch of the machine touches all of them; the time of the adaptation loop (pseudo-labels
or bank look-ups, the steps and the per-epoch evaluation; not the scoring before and after) is divided by the
epochs. Ends with `nrc_epoch_ratio_vs_shot=<x>` and `aad_epoch_ratio_vs_shot=<x>`.

    python scripts/bench_neighbourhood.py                          # trains a small DTN source on fonts first
    python scripts/bench_neighbourhood.py --source runs/src --target builtin:digits/uci
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.classification.neighbourhood import create_adapter  # noqa: E402
from adaptation.classification.shot import AdaptConfig  # noqa: E402
from adaptation.classification.source import SourceConfig, train_source  # noqa: E402
from workbench.logging import RunLogger  # noqa: E402

METHODS = ("shot", "nrc", "aad")


def epoch_seconds(method: str, source: str, target: str, epochs: int, cluster_backend: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        adapter = create_adapter(AdaptConfig(source=source, target=target, method=method, epochs=epochs, test_on="",
                                             cluster_backend=cluster_backend, run_dir=out, progress=False))
        latest = adapter.evaluate_initial()
        logger = RunLogger(out, progress=False)
        start = time.perf_counter()
        adapter.adapt(logger, latest)
        seconds = (time.perf_counter() - start) / epochs
        logger.close()
        return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="a classification source checkpoint (default: train a DTN on "
                   "builtin:digits/fonts for --source-epochs)")
    p.add_argument("--source-epochs", type=int, default=5)
    p.add_argument("--target", default="builtin:digits/uci")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cluster-backend", default="auto", choices=("auto", "faiss", "torch"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            source = str(Path(tmp) / "source")
            train_source(SourceConfig(data="builtin:digits/fonts", backbone="dtn", epochs=args.source_epochs,
                                      run_dir=source, progress=False))
        times = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for method in METHODS:
                times[method].append(epoch_seconds(method, source, args.target, args.epochs, args.cluster_backend))
    median = {m: statistics.median(t) for m, t in times.items()}
    for method in METHODS:
        print(f"{method}: {median[method]:.2f} s per epoch on {args.target} (median of {args.repeats})")
    print(f"nrc_epoch_ratio_vs_shot={median['nrc'] / median['shot']:.2f}")
    print(f"aad_epoch_ratio_vs_shot={median['aad'] / median['shot']:.2f}")


if __name__ == "__main__":
    main()
