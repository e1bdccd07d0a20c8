"""Command lines of source-free adaptation: datasets, train-source, adapt, evaluate.

`train-source` and `adapt` of classification models also run under torchrun, one process per device:

    torchrun --nproc-per-node 2 $(which workbench) adapt --method shot --source ... --target ...
    torchrun --no-python --nproc-per-node 2 workbench adapt ...     (where `which workbench` is a shell
                                                                     shim, as pyenv's is)

Each process trains on its share of the data with its own batch of --batch-size samples (one step sees
batch_size * world_size; config.json records both), and rank 0 writes the run directory and reports.
Segmentation and pose run with one process.
"""

from __future__ import annotations

import argparse
import json

from workbench.arguments import (ArgumentParser, TaskOptions, at_least, non_negative_int, positive_float,
                                 positive_int, report_error, seed)
from workbench.backbones import list_backbones
from workbench.distributed import SINGLE, Distributed, single_process_only
from workbench.files import WriteError
from workbench.runtime import DEVICE_CHOICES
from workbench.tasks import check_method, load_task, method_tasks, tasks_with

from .common import INPUT_ERRORS


def _fail(exc: Exception) -> int:
    """A problem with the input: one line, exit status 2."""
    report_error(str(exc))
    return 2


def _write_failed(exc: WriteError) -> int:
    """An output that could not be written (the previous version is kept): one line, exit status 1."""
    report_error(str(exc), every_rank=True)
    return 1


def _claim_out(run_dir: str, overwrite: bool, dist: Distributed = SINGLE, resume_hint: str = "") -> None:
    """Refuse an --out that holds an earlier run unless --overwrite (checked by rank 0, raised on every rank)."""
    from workbench.logging import claim_run_dir

    if run_dir:
        dist.main_only(lambda: claim_run_dir(run_dir, overwrite, "--out", resume_hint), INPUT_ERRORS)


OVERWRITE_HELP = "replace the run in --out (its checkpoints, metrics and TensorBoard events are removed first)"


def datasets_main(argv=None) -> int:
    builtin = {task.BUILTIN: task for task in map(load_task, tasks_with("build_builtin"))}  # family -> task

    def builtin_domain(name: str) -> tuple[str, str]:
        """`uci`, `digits/uci`, `builtin:scenes/printed` ... -> (family, domain)."""
        family, _, domain = name.removeprefix("builtin:").rpartition("/")
        matches = [f for f, task in builtin.items() if domain in task.builtin_domains() and family in ("", f)]
        if not matches:
            known = ", ".join(f"{f}/{d}" for f, task in builtin.items() for d in task.builtin_domains())
            raise ValueError(f"unknown built-in domain {name!r}: choose from {known}")
        return matches[0], domain

    p = ArgumentParser(prog="workbench datasets",
                                description="The built-in benchmarks: digits (classification), digit scenes "
                                            "(segmentation), articulated figures (pose) and crowd videos (detection "
                                            "and pose tracking).")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the built-in domains and whether they are built")
    build = sub.add_parser("build", help="build (and cache) built-in domains")
    build.add_argument("domains", nargs="*", help="e.g. uci, digits/fonts, scenes/printed, figures/flat, "
                       "crowds/textured (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    try:
        if args.action == "list":
            for family, task in builtin.items():
                for domain in task.builtin_domains():
                    path = task.builtin_path(domain)
                    print(f"builtin:{family}/{domain:8s} {'built' if path.exists() else 'not built'}  {path}")
            return 0
        names = args.domains or [f"{f}/{d}" for f, task in builtin.items() for d in task.builtin_domains()]
        for family, domain in [builtin_domain(name) for name in names]:
            print(builtin[family].build_builtin(domain, force=args.force))
    except INPUT_ERRORS as exc:
        return _fail(exc)
    return 0


def model_tasks() -> list[str]:
    """The tasks whose models `train-source`, `adapt --task` and `evaluate` handle (workbench.tasks)."""
    return tasks_with("evaluate")


def _model_task(path) -> str | None:
    """The task a model checkpoint names (None when it cannot be read: the pipeline then reports why)."""
    from workbench.checkpoint import load_checkpoint

    from .dense.model import MODEL_KINDS, checkpoint_task

    try:
        return checkpoint_task(load_checkpoint(path, kind=MODEL_KINDS))
    except Exception:  # noqa: BLE001  (missing or foreign files fail again, with their message, in the pipeline)
        return None


def _resolve_task(flag: str | None, path) -> str:
    """--task if given, else the checkpoint's task; a --task the checkpoint contradicts is an error."""
    stored = _model_task(path)
    if flag and stored and flag != stored:
        raise ValueError(f"{path} holds a {stored} model but --task {flag} was given: pass a {flag} checkpoint "
                         f"or drop --task")
    return flag or stored or "classification"


def train_source_main(argv=None) -> int:
    """Train a source model; under torchrun every worker runs this and rank 0 writes and reports."""
    from workbench.distributed import worker_main

    return worker_main(lambda: _train_source(argv))


def _defaults(command: str, field: str, tasks=None) -> str:
    """`field`'s default in each task's `command` config ("classification 64, segmentation 16, ..."); tasks
    without one (a None default: resolved from the data) are left out."""
    values = [(name, getattr(getattr(load_task(name), f"{command}_defaults")(), field, None))
              for name in tasks or tasks_with(f"{command}_defaults")]
    return ", ".join(f"{name} {value}" for name, value in values if value is not None)


def task_options(parser: ArgumentParser, command: str, adds: str) -> TaskOptions:
    """Each task's own options of `command`, added by its module's `adds` function (workbench.tasks)."""
    options = TaskOptions(parser, command)
    for name in tasks_with(adds):
        getattr(load_task(name), adds)(options.for_task(name))
    return options


def _train_source(argv) -> int:
    from workbench.distributed import init_distributed

    p = ArgumentParser(prog="workbench train-source",
                       description="Train the source model (classification: label smoothing; segmentation: "
                                   "CE with ignore 255, SGD poly; the best check on a selection set is kept).")
    p.add_argument("--task", default="classification", choices=tasks_with("train_source"))
    d = {name: load_task(name).source_defaults() for name in tasks_with("source_defaults")}
    p.add_argument("--data", default=None, help=f"classification: builtin:digits/<domain>, a list file or a "
                   f"class-folder root (default {d['classification'].data}); segmentation: builtin:scenes/<domain>, "
                   f"an images/+masks/ folder or a '<image> <mask>' list (default {d['segmentation'].data}); pose: "
                   f"builtin:figures/<domain>, a COCO keypoint JSON or a folder holding annotations.json (default "
                   f"{d['pose'].data})")
    p.add_argument("--backbone", default=None, help=f"one of {', '.join(list_backbones())} (default: the task's, "
                   f"{_defaults('source', 'backbone')})")
    p.add_argument("--pretrained", default=None, help="a local torchvision-format weights file for the backbone")
    p.add_argument("--epochs", type=positive_int, default=None, help=f"default: the task's, "
                   f"{_defaults('source', 'epochs')}")
    p.add_argument("--batch-size", type=at_least(2), default=None, help=f"default: the task's, "
                   f"{_defaults('source', 'batch_size')}; under torchrun per process (one step sees batch size x "
                   f"processes)")
    p.add_argument("--lr", type=positive_float, default=None, help="default: the task's (classification 0.01; "
                   "segmentation 0.01 with SGD, 2e-3 with Adam; pose 1e-3)")
    p.add_argument("--select-on", default=None, help="data to select the checkpoint on (default: the val split "
                   "of built-in domains, so that their test split is only reported; else a held-out 10%% of --data). "
                   "The digits benchmark preset selects on test, as SHOT's digits protocol does")
    p.add_argument("--eval-target", default=None, help="also report accuracy (mIoU, AP) on this data at the end")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--out", default="", help="run directory (default runs/source-<backbone>-s<seed>-<time>)")
    p.add_argument("--no-progress", action="store_true")
    options = task_options(p, "train-source", "add_source_options")
    a = p.parse_args(argv)
    if a.resume and a.overwrite:
        return _fail(ValueError("--resume continues the run in --out and --overwrite replaces it: pass one"))
    task = load_task(a.task)
    try:
        options.check(a, a.task)
        if not task.DISTRIBUTED:
            single_process_only(f"{a.task} source training")
        cfg = task.source_config(a)
        dist = init_distributed(a.device) if task.DISTRIBUTED else SINGLE
        if not a.resume:
            _claim_out(a.out, a.overwrite, dist,
                       resume_hint="continue it with --resume" if getattr(task, "RESUMABLE", False) else "")
        metrics = task.train_source(cfg, dist)
    except INPUT_ERRORS as exc:
        return _fail(exc)
    except WriteError as exc:
        return _write_failed(exc)
    if dist.is_main:
        task.report_source(metrics)
    return 0


def adapt_config(argv=None):
    """The config of an `adapt` command line: an AdaptConfig for classification (options left out take the
    benchmark's official value), a DenseAdaptConfig for segmentation. Without --task the task is read from
    the source checkpoint; a `procgen:<game>[:<visual options>]` target gives a ProcgenAdaptConfig."""
    parser, options = _adapt_parser()
    return config_from_adapt_args(parser.parse_args(argv), options)


def _adapt_parser() -> tuple[ArgumentParser, TaskOptions]:
    p = ArgumentParser(prog="workbench adapt", description="Source-free adaptation of a source model.")
    p.add_argument("--task", default=None, choices=tasks_with("adapt_config"), help="default: the task the --source "
                   "checkpoint names (procgen for a procgen:<game>[:<visual options>] --target)")
    methods = "; ".join(f"{name}: {', '.join(load_task(name).METHODS)} (default {load_task(name).adapt_defaults().method})"
                        for name in tasks_with("adapt_config"))
    p.add_argument("--method", default=None, choices=sorted(method_tasks()), help=methods)
    p.add_argument("--source", required=True, help="a source checkpoint (or its run directory)")
    p.add_argument("--target", required=True, help="unlabelled target data (labels, if present, only for metrics)")
    p.add_argument("--out", default="", help="run directory (default runs/adapt-<method>-s<seed>-<time>); one that "
                   "holds a run is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the task's (30 for digits, SHOT++ 15; "
                   f"15 for images and segmentation; {_defaults('adapt', 'epochs', ('pose', 'procgen'))})")
    p.add_argument("--batch-size", type=at_least(2), default=None, help=f"default: the task's, "
                   f"{_defaults('adapt', 'batch_size')}; under torchrun per process (one step sees batch size x "
                   f"processes)")
    p.add_argument("--lr", type=positive_float, default=None, help=f"default: the task's (classification 0.01, "
                   f"VisDA-C 0.001; {_defaults('adapt', 'lr', ('segmentation', 'pose', 'procgen'))})")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--no-progress", action="store_true")
    return p, task_options(p, "adapt", "add_adapt_options")


def adapt_task(a: argparse.Namespace) -> str:
    """The task an adapt command line runs: procgen for a `procgen:` target, else --task or the checkpoint's."""
    return "procgen" if a.target.startswith("procgen:") else _resolve_task(a.task, a.source)


def config_from_adapt_args(a: argparse.Namespace, options: TaskOptions):
    """The adapt config of parsed options, after the checks: the method runs on the task, every option given
    applies to it."""
    task = adapt_task(a)
    if not hasattr(load_task(task), "adapt_config"):
        raise ValueError(f"{a.source} holds a {task} model, which has no adaptation method: adapt one of "
                         f"{', '.join(tasks_with('adapt_config'))}")
    check_method(task, a.method)
    options.check(a, task)
    return load_task(task).adapt_config(a)


def adapt_main(argv=None) -> int:
    """Adapt a source model; under torchrun every worker runs this and rank 0 writes and reports."""
    from workbench.distributed import worker_main

    return worker_main(lambda: _adapt(argv))


def _adapt(argv) -> int:
    from workbench.distributed import init_distributed

    parser, options = _adapt_parser()
    a = parser.parse_args(argv)
    try:
        name = adapt_task(a)
        task = load_task(name)
        cfg = config_from_adapt_args(a, options)
        if not task.DISTRIBUTED:
            single_process_only("Procgen agent adaptation" if name == "procgen" else f"{name} adaptation")
        dist = init_distributed(cfg.device) if task.DISTRIBUTED else SINGLE
        if getattr(cfg, "resume", False):
            if a.overwrite:
                raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one")
        else:
            _claim_out(cfg.run_dir, a.overwrite, dist,
                       resume_hint="continue it with --resume" if getattr(task, "ADAPT_RESUMABLE", False) else "")
        metrics = task.run_adapt(cfg, dist)
    except INPUT_ERRORS as exc:
        return _fail(exc)
    except WriteError as exc:
        return _write_failed(exc)
    if dist.is_main:
        task.report_adapt(cfg, metrics)
    return 0


def evaluate_main(argv=None) -> int:
    p = ArgumentParser(prog="workbench evaluate", description="Accuracy (classification), mIoU "
                       "(segmentation), PCK and OKS AP (pose) or COCO box AP (detection) of a source or adapted "
                       "model; PoseTrack's MOTA, MOTP, identity switches and AP of `workbench track`'s tracks "
                       "(tracking: --model is the track run).")
    p.add_argument("--model", required=True, help="a source or adapted checkpoint (or its run directory)")
    p.add_argument("--data", required=True)
    p.add_argument("--task", default=None, choices=model_tasks(), help="default: the task the checkpoint names")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default=None, help="also write the result as JSON")
    options = task_options(p, "evaluate", "add_evaluate_options")
    a = p.parse_args(argv)
    try:
        task = _resolve_task(a.task, a.model)
        options.check(a, task)
        result = load_task(task).evaluate(a)
        if a.out:
            from workbench.logging import write_json

            write_json(a.out, result)
    except INPUT_ERRORS as exc:
        return _fail(exc)
    except WriteError as exc:
        return _write_failed(exc)
    print(json.dumps(result, indent=2))
    return 0
