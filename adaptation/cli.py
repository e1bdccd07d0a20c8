"""Command lines of source-free adaptation: datasets, train-source, adapt, evaluate."""

from __future__ import annotations

import argparse
import json
import sys

from workbench.backbones import list_backbones
from workbench.checkpoint import CheckpointError
from workbench.runtime import DEVICE_CHOICES

from . import digits
from .data import DataError

USER_ERRORS = (DataError, CheckpointError, ValueError, FileNotFoundError)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def datasets_main(argv=None) -> int:
    from .dense import scenes

    def builtin_domain(name: str) -> tuple[str, str]:
        """`uci`, `digits/uci`, `builtin:scenes/printed` ... -> (family, domain)."""
        families = {"digits": digits.DOMAINS, "scenes": scenes.DOMAINS}
        family, _, domain = name.removeprefix("builtin:").rpartition("/")
        matches = [f for f, domains in families.items() if domain in domains and family in ("", f)]
        if not matches:
            known = ", ".join(f"{f}/{d}" for f, domains in families.items() for d in domains)
            raise ValueError(f"unknown built-in domain {name!r}: choose from {known}")
        return matches[0], domain

    p = argparse.ArgumentParser(prog="workbench datasets",
                                description="The built-in benchmarks: digits (classification) and digit scenes "
                                            "(segmentation).")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the built-in domains and whether they are built")
    build = sub.add_parser("build", help="build (and cache) built-in domains")
    build.add_argument("domains", nargs="*", help="e.g. uci, digits/fonts, scenes/printed (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    try:
        if args.action == "list":
            for domain in digits.DOMAINS:
                path = digits.cache_path(domain)
                print(f"builtin:digits/{domain:8s} {'built' if path.exists() else 'not built'}  {path}")
            for domain in scenes.DOMAINS:
                path = scenes.cache_path(domain)
                print(f"builtin:scenes/{domain:8s} {'built' if path.exists() else 'not built'}  {path}")
            return 0
        names = args.domains or [f"digits/{d}" for d in digits.DOMAINS] + [f"scenes/{d}" for d in scenes.DOMAINS]
        for family, domain in [builtin_domain(name) for name in names]:
            if family == "digits":
                path = digits.build_domain(domain, force=args.force)
                x_train, _ = digits.load_domain(domain, "train")
                x_test, _ = digits.load_domain(domain, "test")
                print(f"builtin:digits/{domain}: {len(x_train)} train / {len(x_test)} test images -> {path}")
            else:
                path = scenes.build_domain(domain, force=args.force)
                arrays = scenes.load_domain(domain)
                print(f"builtin:scenes/{domain}: {len(arrays['x_train'])} train / {len(arrays['x_test'])} test "
                      f"{scenes.SIZE}x{scenes.SIZE} scenes, {scenes.NUM_CLASSES} classes -> {path}")
    except USER_ERRORS as exc:
        return _fail(exc)
    return 0


def train_source_main(argv=None) -> int:
    from .source import SourceConfig, train_source

    d = SourceConfig()
    p = argparse.ArgumentParser(prog="workbench train-source",
                                description="Train the source model (label smoothing; the best of ten checks on a selection set is kept).")
    p.add_argument("--data", default=d.data, help="builtin:digits/<domain>, a list file or a class-folder root")
    p.add_argument("--backbone", default=d.backbone, help=f"one of {', '.join(list_backbones())}")
    p.add_argument("--pretrained", default=None, help="a local torchvision-format weights file for the backbone")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the data")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--transform", choices=("digits", "imagenet"), default=None, help="default: from the data")
    p.add_argument("--select-on", default=None, help="data to select the checkpoint on (default: the test split "
                   "of built-in digits, else a held-out 10%% of --data)")
    p.add_argument("--eval-target", default=None, help="also report accuracy on this data at the end")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--out", default="", help="run directory (default runs/source-<backbone>-s<seed>-<time>)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        metrics = train_source(SourceConfig(
            data=a.data, backbone=a.backbone, num_classes=a.num_classes, epochs=a.epochs, batch_size=a.batch_size,
            lr=a.lr, pretrained=a.pretrained, transform=a.transform, select_on=a.select_on,
            eval_target=a.eval_target, seed=a.seed,
            device=a.device, workers=a.workers, run_dir=a.out, progress=not a.no_progress))
    except USER_ERRORS as exc:
        return _fail(exc)
    print(f"selected model: {metrics['selection_accuracy']:.2f}% on {metrics['selection_data']} "
          f"(iteration {metrics['iteration']}, epoch {metrics['epoch']:.1f}); "
          f"checkpoint {metrics['checkpoint']}")
    if "target" in metrics:
        print(f"accuracy on {metrics['target']['data']}: {metrics['target']['accuracy']:.2f}%")
    return 0


def adapt_config(argv=None):
    """The AdaptConfig of an `adapt` command line; options left out take the benchmark's official value."""
    from .shot import BENCHMARKS, METHODS, AdaptConfig
    from .rotation import KEEP_CHOICES

    d = AdaptConfig()
    p = argparse.ArgumentParser(prog="workbench adapt", description="Source-free adaptation of a source model.")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--source", required=True, help="a source checkpoint (or its run directory)")
    p.add_argument("--target", required=True, help="unlabelled target data (labels, if present, only for metrics)")
    p.add_argument("--out", default="", help="run directory (default runs/adapt-<method>-s<seed>-<time>)")
    p.add_argument("--benchmark", default=None, choices=BENCHMARKS,
                   help="whose official settings to use (default: digits for digits data, office-home for images)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default 30 for digits (SHOT++ 15), 15 for images")
    p.add_argument("--beta", type=float, default=None, help="pseudo-label weight (default 0.1 digits, 0.3 images)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="default 0.01 (VisDA-C 0.001)")
    p.add_argument("--rotation-weight", type=float, default=None, help="SHOT++ (default 0.2 digits, 0.6 images)")
    p.add_argument("--rotation-epochs", type=int, default=None, help="SHOT++ rotation-head pre-training "
                   "(default: the adaptation epochs)")
    p.add_argument("--rotation-keep", default=d.rotation_keep, choices=KEEP_CHOICES,
                   help="pre-trained rotation head to keep: best rotation accuracy, or the last")
    p.add_argument("--transfer-epochs", type=int, default=None, help="SHOT++ labeling transfer (default: digits "
                   "30, office31 100, office-home 50, visda-c 10)")
    p.add_argument("--transfer-batch-size", type=int, default=None, help="default 36 (24 with resnet101)")
    p.add_argument("--transfer-classifier", default=d.transfer_classifier, choices=("fresh", "adapted"),
                   help="classifier MixMatch starts from: a new one (the official code) or the adapted one")
    p.add_argument("--mix-alpha", type=float, default=None, help="MixMatch Beta(alpha, alpha) (default 0.1 digits, "
                   "0.75 images)")
    p.add_argument("--cluster-backend", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--test-on", default=None, help="held-out target data scored before and after adapting "
                   "(default: the test split of built-in digits)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return AdaptConfig(
        source=a.source, target=a.target, method=a.method, benchmark=a.benchmark, epochs=a.epochs, beta=a.beta,
        batch_size=a.batch_size, lr=a.lr, rotation_weight=a.rotation_weight, rotation_epochs=a.rotation_epochs,
        rotation_keep=a.rotation_keep, transfer_epochs=a.transfer_epochs, transfer_batch_size=a.transfer_batch_size,
        transfer_classifier=a.transfer_classifier, mix_alpha=a.mix_alpha, cluster_backend=a.cluster_backend,
        test_on=a.test_on, seed=a.seed, device=a.device, workers=a.workers, run_dir=a.out,
        progress=not a.no_progress)


def adapt_main(argv=None) -> int:
    from .shot import ShotAdapter

    cfg = adapt_config(argv)
    try:
        adapter = ShotAdapter(cfg)
        metrics = adapter.run()
    except USER_ERRORS as exc:
        return _fail(exc)
    if metrics["accuracy"] is not None:
        print(f"{cfg.method}: target accuracy {metrics['source_only_accuracy']:.2f}% (source model) -> "
              f"{metrics['accuracy']:.2f}%")
    if metrics["test_accuracy"] is not None:
        print(f"{cfg.method}: held-out {metrics['test_data']} {metrics['source_only_test_accuracy']:.2f}% -> "
              f"{metrics['test_accuracy']:.2f}%")
    print(f"adapted model, predictions.csv and metrics.json in {adapter.run_dir}; "
          f"tensorboard --logdir {adapter.run_dir}")
    return 0


def evaluate_main(argv=None) -> int:
    from .evaluate import evaluate_model

    p = argparse.ArgumentParser(prog="workbench evaluate", description="Accuracy of a source or adapted model.")
    p.add_argument("--model", required=True, help="a source or adapted checkpoint (or its run directory)")
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default=None, help="also write the result as JSON")
    a = p.parse_args(argv)
    try:
        result = evaluate_model(a.model, a.data, device=a.device)
    except USER_ERRORS as exc:
        return _fail(exc)
    if a.out:
        from workbench.logging import write_json
        write_json(a.out, result)
    print(json.dumps(result, indent=2))
    return 0
