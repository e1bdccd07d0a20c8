"""`workbench quickstart`: the adaptation half end to end on a small built-in default, in minutes on a CPU.

    workbench quickstart                                  # DTN on fonts, SHOT to uci, the paper's 30 + 30 epochs
    workbench quickstart --target photo --method shot++  # another built-in pair or method

1. Train a source model on the labelled source domain (`train-source`; the checkpoint is selected on the
   source's val split, so the target's labels are never looked at).
2. Adapt it to the target's unlabelled images (its trainval split: train + val) with `adapt`, scoring the
   source model and the adapted model on the target's held-out test split.
3. Print both beside chance level and write `adaptation_curve.png` (target accuracy per adaptation epoch)
   next to the two runs' TensorBoard logs.

The default pair is the digits analogue of SHOT's SVHN -> MNIST: printed house-number-like glyphs
(`fonts`) to handwriting (`uci`), with SHOT's digit backbone (DTN) and its digit epochs. A stopped
quickstart continues when run again with the same --out: a finished source is reused, an unfinished
one resumes from its train state, and the adaptation (about a minute) starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from workbench.arguments import ArgumentParser, positive_int, seed
from workbench.files import WriteError
from workbench.logging import default_run_name, plot_learning_curve, read_scalars, write_json
from workbench.runtime import DEVICE_CHOICES

from .. import digits
from ..common import INPUT_ERRORS

SOURCE_DOMAIN, TARGET_DOMAIN = "fonts", "uci"
QUICKSTART_METHODS = ("shot-im", "shot", "shot++")
SUMMARY = "quickstart.json"
CURVE = "adaptation_curve.png"


def parse_args(argv=None):
    p = ArgumentParser(prog="workbench quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=SOURCE_DOMAIN, choices=digits.DOMAINS, help="built-in digits domain to "
                   f"train the source model on (default {SOURCE_DOMAIN})")
    p.add_argument("--target", default=TARGET_DOMAIN, choices=digits.DOMAINS, help="built-in digits domain to "
                   f"adapt to without its labels (default {TARGET_DOMAIN})")
    p.add_argument("--method", default="shot", choices=QUICKSTART_METHODS)
    p.add_argument("--backbone", default="dtn", help="default dtn (SHOT's digits network)")
    p.add_argument("--source-epochs", type=positive_int, default=None, help="default 30 (the paper's digits setting)")
    p.add_argument("--epochs", type=positive_int, default=None, help="adaptation epochs (default: the paper's)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default=None, help="folder for the two runs (default runs/quickstart-<source>-to-"
                   "<target>-<time>); run again with the same --out to continue a stopped quickstart")
    p.add_argument("--overwrite", action="store_true", help="replace a finished quickstart in --out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.source == a.target:
        p.error(f"--source and --target are both {a.source!r}: adapt to another domain "
                f"({', '.join(d for d in digits.DOMAINS if d != a.source)})")
    return a


def train_or_reuse_source(a, run: Path) -> dict:
    """The source run in `run`: reused when finished, resumed when stopped, else trained from scratch."""
    from .source import SourceConfig, train_source

    if (run / "metrics.json").exists():
        print(f"source model: reusing the finished run in {run}")
        return json.loads((run / "metrics.json").read_text())
    cfg = SourceConfig(data=f"builtin:digits/{a.source}", backbone=a.backbone, seed=a.seed, device=a.device,
                       run_dir=str(run), resume=(run / "train-state.pt").exists(), progress=not a.no_progress)
    if a.source_epochs is not None:
        cfg.epochs = a.source_epochs
    return train_source(cfg)


def adapt(a, source: Path, run: Path) -> dict:
    from .shot import AdaptConfig, ShotAdapter

    if run.exists():  # a stopped adaptation starts over: it is the short stage
        shutil.rmtree(run)
    cfg = AdaptConfig(source=str(source), target=f"builtin:digits/{a.target}", method=a.method, epochs=a.epochs,
                      seed=a.seed, device=a.device, run_dir=str(run), progress=not a.no_progress)
    return ShotAdapter(cfg).run()


def write_curve(out: Path, adapted_run: Path, metrics: dict, method: str, source: str) -> Path:
    """Accuracy on the adapted target images (trainval) per epoch, with the source model's and chance as lines."""
    points = read_scalars(adapted_run, ("target/accuracy",))["target/accuracy"]
    chance = 100.0 / digits.NUM_CLASSES
    return plot_learning_curve(
        out / CURVE, {f"{method}: accuracy on the unlabelled target images (trainval)": points},
        {f"source model on the same images ({metrics['source_only_accuracy']:.1f}%)": metrics["source_only_accuracy"],
         f"chance ({chance:.0f}%)": chance},
        title=f"{method}: source model from {source}, adapted to {metrics['target']}", xlabel="adaptation epoch (-1: before)",
        ylabel="accuracy (%)")


def quickstart(a) -> dict:
    out = Path(a.out or Path("runs") / default_run_name("quickstart", f"{a.source}-to-{a.target}"))
    if (out / SUMMARY).exists():
        if not a.overwrite:
            raise ValueError(f"{out} already holds a finished quickstart ({SUMMARY}): pass --overwrite to replace "
                             f"it, or choose another --out")
        for name in ("source", *QUICKSTART_METHODS, SUMMARY, CURVE):  # the quickstart's own outputs, nothing else
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    start = time.time()
    source_run, adapted_run = out / "source", out / a.method
    source = train_or_reuse_source(a, source_run)
    metrics = adapt(a, source_run, adapted_run)
    summary = {
        "source": f"builtin:digits/{a.source}", "target": f"builtin:digits/{a.target}", "method": a.method,
        "backbone": a.backbone, "seed": a.seed,
        "source_selection": {"data": source["selection_data"], "accuracy": source["selection_accuracy"]},
        "test_data": metrics["test_data"], "chance_accuracy": 100.0 / digits.NUM_CLASSES,
        "source_only_test_accuracy": metrics["source_only_test_accuracy"],
        "adapted_test_accuracy": metrics["test_accuracy"],
        "source_run": str(source_run), "adapted_run": str(adapted_run), "wall_seconds": time.time() - start}
    summary["curve"] = str(write_curve(out, adapted_run, metrics, a.method, summary["source"]))
    write_json(out / SUMMARY, summary)
    return summary


def report(s: dict) -> None:
    width = max(len("source model alone"), len(f"after {s['method']}"))
    print(f"\nsource model ({s['backbone']}, trained on {s['source']}): {s['source_selection']['accuracy']:.1f}% on "
          f"{s['source_selection']['data']}, where it was selected")
    print(f"{s['target']} without its labels, scored on its held-out {s['test_data']}:")
    print(f"  {'source model alone':<{width}}  {s['source_only_test_accuracy']:5.1f}%")
    print(f"  {'after ' + s['method']:<{width}}  {s['adapted_test_accuracy']:5.1f}%")
    print(f"  {'chance':<{width}}  {s['chance_accuracy']:5.1f}%")
    out = Path(s["curve"]).parent
    print(f"adaptation curve: {s['curve']}; TensorBoard: tensorboard --logdir {out} "
          f"({s['wall_seconds'] / 60:.1f} min)")
    print("the other half, Procgen agents: python scripts/train_procgen.py")


def quickstart_main(argv=None) -> int:
    from workbench.arguments import report_error
    from workbench.distributed import single_process_only

    a = parse_args(argv)
    try:
        single_process_only("workbench quickstart")
        summary = quickstart(a)
    except INPUT_ERRORS as exc:
        report_error(str(exc))
        return 2
    except WriteError as exc:
        report_error(str(exc))
        return 1
    report(summary)
    return 0
