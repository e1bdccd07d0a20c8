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

from workbench.arguments import (ArgumentParser, at_least, fraction, non_negative_float, non_negative_int,
                                 positive_float, positive_int, report_error, seed, unit_interval)
from workbench.backbones import list_backbones
from workbench.distributed import SINGLE, Distributed, single_process_only
from workbench.files import WriteError
from workbench.runtime import DEVICE_CHOICES, PRECISION_CHOICES
from workbench.tasks import check_method, load_task, tasks_with

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
                                            "(segmentation) and articulated figures (pose).")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the built-in domains and whether they are built")
    build = sub.add_parser("build", help="build (and cache) built-in domains")
    build.add_argument("domains", nargs="*", help="e.g. uci, digits/fonts, scenes/printed, figures/flat "
                       "(default: all)")
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


def _train_source(argv) -> int:
    from workbench.distributed import init_distributed

    from .classification.source import KEEP_CHOICES, SourceConfig
    from .pose.source import PoseSourceConfig
    from .robust.label_noise import NOISE_TYPES
    from .robust.objectives import OBJECTIVES
    from .segmentation.source import DenseSourceConfig

    d, ds, ps = SourceConfig(), DenseSourceConfig(), PoseSourceConfig()
    p = ArgumentParser(prog="workbench train-source",
                       description="Train the source model (classification: label smoothing; segmentation: "
                                   "CE with ignore 255, SGD poly; the best check on a selection set is kept).")
    p.add_argument("--task", default="classification", choices=tasks_with("train_source"))
    p.add_argument("--data", default=None, help=f"builtin:digits/<domain>, a list file or a class-folder root "
                   f"(default {d.data}); segmentation: builtin:scenes/<domain>, an images/+masks/ folder or a "
                   f"'<image> <mask>' list (default {ds.data}); pose: builtin:figures/<domain>, a COCO keypoint "
                   f"JSON or a folder holding annotations.json (default {ps.data})")
    p.add_argument("--backbone", default=None, help=f"one of {', '.join(list_backbones())} "
                   f"(default {d.backbone}; segmentation {ds.backbone}; pose {ps.backbone})")
    p.add_argument("--head", default=None, help=f"segmentation head: fcn, issa, ordnet, hrnet, ocr (default "
                   f"{ds.head}); pose head: deconv, heatmap (default {ps.head})")
    p.add_argument("--head-channels", type=positive_int, default=None, help="dense head width (default: the head's "
                   "published 512, 256 for deconv)")
    p.add_argument("--output-stride", type=positive_int, default=None, help="segmentation ResNet output stride (default 8)")
    p.add_argument("--crop-size", type=positive_int, default=None, help="segmentation training crop (default: 64 for the "
                   "scenes, 512 for user data)")
    p.add_argument("--pretrained", default=None, help="a local torchvision-format weights file for the backbone")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT", help="classification: start the backbone "
                   "from this source or adapted checkpoint (or run directory) of the same backbone, e.g. as the "
                   "pretrained encoder for --objective core-tuning")
    p.add_argument("--num-classes", type=at_least(2), default=None, help="default: from the data")
    p.add_argument("--epochs", type=positive_int, default=None, help=f"default {d.epochs} (segmentation {ds.epochs})")
    p.add_argument("--batch-size", type=at_least(2), default=None, help=f"default {d.batch_size} (segmentation "
                   f"{ds.batch_size}); under torchrun per process (one step sees batch size x processes)")
    p.add_argument("--lr", type=positive_float, default=None, help=f"default {d.lr} (segmentation 0.01 with SGD, 2e-3 with "
                   f"Adam; pose {ps.lr})")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adam"), help="segmentation: SGD (the papers', "
                   "default) or Adam (for from-scratch models)")
    p.add_argument("--transform", choices=("digits", "imagenet"), default=None, help="default: from the data")
    p.add_argument("--select-on", default=None, help="data to select the checkpoint on (default: the val split "
                   "of built-in domains, so that their test split is only reported; else a held-out 10%% of --data). "
                   "The digits benchmark preset selects on test, as SHOT's digits protocol does")
    p.add_argument("--eval-target", default=None, help="also report accuracy (mIoU) on this data at the end")
    p.add_argument("--keep", default=d.keep, choices=KEEP_CHOICES, help="classification: the model to keep, the "
                   "best selection check (default, the official protocol) or the last (noisy-label studies, where "
                   "a clean selection set would be an oracle early stop)")
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES,
                   help="classification: ce (SHOT's label-smoothed cross-entropy), sat (self-adaptive training), "
                   "core-tuning (contrastive fine-tuning of a --pretrained or --init-from encoder), at (PGD adversarial training), "
                   "cifs-at (CIFS on a ResNet's last stage + AT)")
    p.add_argument("--label-noise", type=fraction, default=0.0, metavar="RATE",
                   help="corrupt exactly this fraction of the training labels (seeded by --seed), for experiments")
    p.add_argument("--noise-type", default=d.noise_type, choices=NOISE_TYPES, help="symmetric (default): each "
                   "corrupted label moves to another class, uniformly; pairflip: to the next class; uniform: re-drawn "
                   "from all classes, the SAT code's corruption (about 9/10 of the rate end up wrong with 10 classes)")
    p.add_argument("--resume", action="store_true", help="classification: continue the run in --out from its "
                   "train-state.pt")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help="segmentation and pose: fp32 "
                   "(default) or bf16 autocast (auto: bf16 where the CPU or GPU computes it natively)")
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--out", default="", help="run directory (default runs/source-<backbone>-s<seed>-<time>)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.task == "classification" and a.precision not in (None, "fp32"):
        return _fail(ValueError("--precision applies to segmentation and pose training; classification runs "
                                "in fp32"))
    if a.task != "classification" and (a.objective != "ce" or a.label_noise or a.resume or a.init_from
                                       or a.keep != "best"):
        return _fail(ValueError("--objective, --label-noise, --init-from, --keep and --resume apply to "
                                "classification source training"))
    if a.resume and a.overwrite:
        return _fail(ValueError("--resume continues the run in --out and --overwrite replaces it: pass one"))
    task = load_task(a.task)
    try:
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
    return config_from_adapt_args(parse_adapt_args(argv))


def parse_adapt_args(argv=None) -> argparse.Namespace:
    from .classification.rotation import KEEP_CHOICES
    from .classification.shot import BENCHMARKS, METHODS, AdaptConfig
    from .pose.mean_teacher import METHODS as POSE_METHODS
    from .pose.mean_teacher import PoseAdaptConfig
    from .segmentation.shot import DIVERSITY_PRIORS, PSEUDO_LABELS, DenseAdaptConfig
    from .segmentation.shot import METHODS as DENSE_METHODS

    d, dd, pd = AdaptConfig(), DenseAdaptConfig(), PoseAdaptConfig()
    rd = load_task("procgen").adapt_defaults()
    p = ArgumentParser(prog="workbench adapt", description="Source-free adaptation of a source model.")
    p.add_argument("--task", default=None, choices=model_tasks(), help="default: the task the --source checkpoint "
                   "names")
    p.add_argument("--method", default=None, choices=sorted(set(METHODS) | set(DENSE_METHODS) | set(POSE_METHODS)),
                   help=f"default {d.method}; segmentation offers {', '.join(DENSE_METHODS)} (default {dd.method}); "
                   f"pose offers {', '.join(POSE_METHODS)} (default {pd.method})")
    p.add_argument("--source", required=True, help="a source checkpoint (or its run directory)")
    p.add_argument("--target", required=True, help="unlabelled target data (labels, if present, only for metrics)")
    p.add_argument("--out", default="", help="run directory (default runs/adapt-<method>-s<seed>-<time>); one that "
                   "holds a run is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--benchmark", default=None, choices=BENCHMARKS,
                   help="whose official settings to use (default: digits for digits data, office-home for images)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default 30 for digits (SHOT++ 15), 15 for images and segmentation, {pd.epochs} for pose")
    p.add_argument("--beta", type=non_negative_float, default=None, help="pseudo-label weight (default 0.1 digits, "
                   "0.3 images and segmentation)")
    p.add_argument("--batch-size", type=at_least(2), default=None, help=f"default {d.batch_size} (segmentation "
                   f"{dd.batch_size}); under torchrun per process (one step sees batch size x processes)")
    p.add_argument("--lr", type=positive_float, default=None, help=f"default 0.01 (VisDA-C 0.001; pose {pd.lr})")
    p.add_argument("--ema-alpha", type=unit_interval, default=pd.ema_alpha, help="pose mean teacher: teacher EMA decay")
    p.add_argument("--mask-ratio", type=fraction, default=pd.mask_ratio, help="pose mean teacher: fraction of "
                   "joints (lowest teacher maxima in the batch) left out of the consistency loss")
    p.add_argument("--no-flip-test", action="store_true", help="pose: score without flip testing")
    p.add_argument("--rotation-weight", type=non_negative_float, default=None, help="SHOT++ (default 0.2 digits, 0.6 images)")
    p.add_argument("--rotation-epochs", type=positive_int, default=None, help="SHOT++ rotation-head pre-training "
                   "(default: the adaptation epochs)")
    p.add_argument("--rotation-keep", default=d.rotation_keep, choices=KEEP_CHOICES,
                   help="pre-trained rotation head to keep: the last (default, as the official code ends up with) "
                   "or the one with the best rotation accuracy")
    p.add_argument("--transfer-epochs", type=positive_int, default=None, help="SHOT++ labeling transfer (default: digits "
                   "30, office31 100, office-home 50, visda-c 10)")
    p.add_argument("--transfer-batch-size", type=at_least(2), default=None, help="default 36 (24 with resnet101); per process "
                   "under torchrun")
    p.add_argument("--transfer-classifier", default=d.transfer_classifier, choices=("fresh", "adapted"),
                   help="classifier MixMatch starts from: a new one (the official code) or the adapted one")
    p.add_argument("--mix-alpha", type=positive_float, default=None, help="MixMatch Beta(alpha, alpha) (default 0.1 digits, "
                   "0.75 images)")
    p.add_argument("--pixels-per-image", type=positive_int, default=dd.pixels_per_image,
                   help="segmentation: feature pixels per image sampled to fit the centroids")
    p.add_argument("--schedule", default=dd.schedule, choices=("shot", "poly"),
                   help="segmentation lr schedule: SHOT's (1+10p)^-0.75 or poly 0.9")
    p.add_argument("--diversity-prior", default=None, choices=DIVERSITY_PRIORS,
                   help="IM diversity for segmentation and Procgen: towards the source model's initial mean "
                   f"prediction on the target (initial; segmentation's default, {dd.diversity_prior}: background "
                   f"dominates pixels) or uniform class or action proportions (SHOT; Procgen's default, "
                   f"{rd.diversity_prior}). Only the uniform prior makes --method shot-im SHOT-IM (and shot SHOT); "
                   f"segmentation runs name what ran (metrics.json method_name, e.g. 'im (source prior)')")
    p.add_argument("--diversity-weight", type=non_negative_float, default=dd.diversity_weight,
                   help="segmentation IM diversity weight (SHOT 1; URMA 0, entropy alone)")
    p.add_argument("--pseudo-labels", default=dd.pseudo_labels, choices=PSEUDO_LABELS,
                   help="segmentation SHOT pseudo-labels: SHOT's nearest centroid (centroid, the default) or URMA's "
                   "class-balanced confident predictions (balanced)")
    p.add_argument("--no-save-predictions", action="store_true", help="segmentation: skip the palette PNGs")
    p.add_argument("--cluster-backend", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--test-on", default=None, help="held-out target data scored before and after adapting "
                   "(default: the test split of built-in digits or scenes)")
    p.add_argument("--frames", type=positive_int, default=rd.frames, help="Procgen target: frames collected in the target "
                   f"domain (default {rd.frames})")
    p.add_argument("--collect-policy", default=rd.collect_policy, choices=("source", "random"),
                   help="Procgen target: who acts while frames are collected (the frozen source policy, or random)")
    p.add_argument("--frames-file", default=None, help="Procgen target: adapt on saved frames (a frames.npz "
                   "written by an earlier run) instead of collecting, to repeat an experiment")
    p.add_argument("--recollect", action="store_true", help="Procgen target: collect again with the adapted "
                   "policy before every epoch (adapting during play)")
    p.add_argument("--paired-steps", type=non_negative_int, default=rd.paired_steps, help="Procgen target: steps of 32 envs whose "
                   "states are rendered in both visuals, to measure how far the adapted policy is from the source "
                   "policy on the same states (0 skips)")
    p.add_argument("--eval-episodes", type=non_negative_int, default=rd.eval_episodes, help="Procgen target: test episodes per "
                   "domain for the source and the adapted agent (0 skips)")
    p.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help="segmentation and pose: fp32 "
                   "(default) or bf16 autocast (auto: bf16 where the CPU or GPU computes it natively)")
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def adapt_task(a: argparse.Namespace) -> str:
    """The task an adapt command line runs: procgen for a `procgen:` target, else --task or the checkpoint's."""
    return "procgen" if a.target.startswith("procgen:") else _resolve_task(a.task, a.source)


def config_from_adapt_args(a: argparse.Namespace):
    task = adapt_task(a)
    check_method(task, a.method)
    return load_task(task).adapt_config(a)


def adapt_main(argv=None) -> int:
    """Adapt a source model; under torchrun every worker runs this and rank 0 writes and reports."""
    from workbench.distributed import worker_main

    return worker_main(lambda: _adapt(argv))


def _adapt(argv) -> int:
    from workbench.distributed import init_distributed

    a = parse_adapt_args(argv)
    try:
        name = adapt_task(a)
        task = load_task(name)
        check_method(name, a.method)
        cfg = task.adapt_config(a)
        if not task.DISTRIBUTED:
            single_process_only("Procgen agent adaptation" if name == "procgen" else f"{name} adaptation")
        dist = init_distributed(cfg.device) if task.DISTRIBUTED else SINGLE
        _claim_out(cfg.run_dir, a.overwrite, dist)
        metrics = task.run_adapt(cfg, dist)
    except INPUT_ERRORS as exc:
        return _fail(exc)
    except WriteError as exc:
        return _write_failed(exc)
    if dist.is_main:
        task.report_adapt(cfg, metrics)
    return 0


def evaluate_main(argv=None) -> int:
    from .classification.evaluate import ATTACK_LOSSES

    p = ArgumentParser(prog="workbench evaluate", description="Accuracy (classification), mIoU "
                       "(segmentation) or PCK and OKS AP (pose) of a source or adapted model.")
    p.add_argument("--model", required=True, help="a source or adapted checkpoint (or its run directory)")
    p.add_argument("--data", required=True)
    p.add_argument("--task", default=None, choices=model_tasks(), help="default: the task the checkpoint names")
    p.add_argument("--save-predictions", default=None, metavar="PATH",
                   help="segmentation: write one palette PNG label map per image into the folder PATH; pose: "
                   "write the predicted keypoints as a COCO result JSON file PATH")
    p.add_argument("--no-flip-test", action="store_true", help="pose: score without flip testing")
    p.add_argument("--attack", default=None, choices=("pgd",), help="classification: also report accuracy under "
                   "an L-inf PGD attack (from the clean image; step eps/10 at 20 steps or more as the CIFS code, "
                   "max(eps/10, 2.5 eps/steps) below; CIFS models through their joint loss)")
    p.add_argument("--eps", type=unit_interval, default=8 / 255, help="attack budget in [0, 1] pixel units (default 8/255)")
    p.add_argument("--steps", type=positive_int, default=20, help="attack steps (default 20: PGD-20)")
    p.add_argument("--attack-loss", default="model", choices=ATTACK_LOSSES, help="what PGD ascends: the "
                   "model's training loss (default; CIFS: the joint loss with its probes, as the CIFS code) or the "
                   "cross-entropy of the output logits alone")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default=None, help="also write the result as JSON")
    a = p.parse_args(argv)
    try:
        task = _resolve_task(a.task, a.model)
        if a.attack and task != "classification":
            raise ValueError("--attack evaluates classifiers only")
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
