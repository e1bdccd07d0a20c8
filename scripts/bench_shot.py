#!/usr/bin/env python
"""Speed of SHOT's pieces: pseudo-labelling 50,000 x 256 features with 65 classes (faiss and torch
paths) and one adaptation epoch on a built-in digits domain.

Ends with `pseudo_label_seconds=<x>`, the faster path's time (median of --repeats runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workbench.adapt.cluster import faiss_available, shot_pseudo_labels  # noqa: E402


def time_pseudo_labels(backend: str, features: torch.Tensor, probs: torch.Tensor, repeats: int) -> float:
    shot_pseudo_labels(features, probs, backend=backend)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        shot_pseudo_labels(features, probs, backend=backend)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_adaptation_epoch(source_domain: str, target_domain: str, backbone: str) -> tuple[float, float]:
    from adaptation.classification.shot import AdaptConfig, ShotAdapter
    from adaptation.classification.source import SourceConfig, train_source

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_source(SourceConfig(data=f"builtin:digits/{source_domain}", backbone=backbone, epochs=1,
                                  run_dir=f"{tmp}/src", progress=False))
        source_seconds = time.perf_counter() - start
        adapter = ShotAdapter(AdaptConfig(source=f"{tmp}/src", target=f"builtin:digits/{target_domain}",
                                          method="shot", epochs=1, run_dir=f"{tmp}/adapt", progress=False))
        start = time.perf_counter()
        adapter.run()
        return source_seconds, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=65)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--source", default="uci")
    p.add_argument("--target", default="photo")
    p.add_argument("--backbone", default="dtn")
    p.add_argument("--skip-epoch", action="store_true", help="only time pseudo-labelling")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    features = torch.randn(args.samples, args.dim, generator=g)
    probs = torch.softmax(torch.randn(args.samples, args.classes, generator=g) * 3, dim=1)
    print(f"pseudo-labelling {args.samples} x {args.dim} features, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()}")
    timings = {"torch": time_pseudo_labels("torch", features, probs, args.repeats)}
    if faiss_available():
        timings["faiss"] = time_pseudo_labels("faiss", features, probs, args.repeats)
    else:
        print("  faiss not importable: torch path only")
    for backend, seconds in timings.items():
        print(f"  {backend:5s}: {seconds:.3f} s (median of {args.repeats})")
    if not args.skip_epoch:
        source_s, adapt_s = time_adaptation_epoch(args.source, args.target, args.backbone)
        print(f"one source epoch on {args.source} ({args.backbone}): {source_s:.1f} s; one SHOT epoch on "
              f"{args.target} (pseudo-labels, training, evaluation): {adapt_s:.1f} s")
    print(f"pseudo_label_seconds={min(timings.values()):.3f}")


if __name__ == "__main__":
    main()
