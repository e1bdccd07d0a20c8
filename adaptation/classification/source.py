"""Source training for SHOT (Liang et al. 2020): the model that adaptation starts from.

Cross-entropy with label smoothing 0.1. SGD (momentum 0.9, Nesterov, weight decay 1e-3) with
lr = lr0 (1 + 10 p)^-0.75, the backbone at 0.1x when it starts from pretrained weights.

Model selection as the official code does it: the accuracy on a selection set is checked ten
times over the run (every tenth of the iterations) and the last of the best checks is kept
(`>=`). The selection set is
- for built-in digits, the domain's val split, training on its train split (the two are disjoint, and
  the test split stays for reporting). The official digits protocol trains on the published train set
  (our trainval) and selects on the test set: the digits benchmark asks for that with `select_on`;
- otherwise a held-out 10% of the source data, training on the other 90% (the official
  image protocol), or any data passed as `select_on` (refused where it overlaps the training data).

The objective is SHOT's cross-entropy by default; `objective` picks a robust one instead
(adaptation.robust.objectives: self-adaptive training, Core-tuning, PGD adversarial training, CIFS with
AT), and `label_noise` corrupts the training labels reproducibly (adaptation.label_noise; the clean
labels stay for reporting; selection data is never corrupted). The backbone starts from torchvision
weights (`pretrained`, ResNets) or from the backbone of any source or adapted checkpoint of the same
kind (`init_from`), at 0.1x the learning rate in both cases. The adversarial objectives select on
PGD accuracy over the first ROBUST_SLICE selection samples, as the CIFS code keeps its most robust
epoch. At every check the full training state (model, optimiser, the objective's own state such as
SAT's soft targets, counters, RNG) is written to train-state.pt, from which `resume` continues.

Under torchrun (`train_source(cfg, dist)`) rank 0's freshly initialised model is broadcast, every rank
trains on its share of the data (per-rank batches of `batch_size`; the effective batch is
batch_size * world_size) with averaged gradients and synchronised batch norm (SAT's soft targets move for
every rank's batch on every rank, so all ranks hold one table), the selection accuracy is
computed on predictions gathered from every rank (so all ranks select the same step), and rank 0
alone writes the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

from workbench.adapt.training import (accuracy, average_batch_norm_statistics, forever, make_loader, predict,
                       set_shot_lr, shot_optimizer, synchronise_batch_norm, take_step)
from workbench.adapt.selection import KEEP_CHOICES, Selection
from workbench.checkpoint import load_checkpoint, save_checkpoint
from workbench.distributed import SINGLE, Distributed
from workbench.logging import default_run_name, run_logger, write_json
from workbench.runtime import RunSettings, Runtime, rng_state, seed_everything, set_rng_state

from .. import digits
from ..common import INPUT_ERRORS, split_holdout
from ..robust.adversarial import EVAL_STEPS, evaluation_attack, robust_accuracy
from ..robust.label_noise import NOISE_TYPES, corrupt_labels
from ..robust.objectives import OBJECTIVES, build_objective, cifs_joint_loss
from .data import class_subset, default_style, image_transform, load_dataset, parse_builtin
from .model import ShotModel, model_config

SOURCE_KIND = "source-model"
CHECKPOINT = "source.pt"
TRAIN_STATE, TRAIN_STATE_KIND = "train-state.pt", "source-training"
ROBUST_SLICE = 512          # selection samples attacked at every check of the adversarial objectives
ADVERSARIAL = ("at", "cifs-at")
# which model the checkpoint keeps (workbench.adapt.selection.KEEP_CHOICES): the best selection check, or the final
# model (with noisy training labels a clean selection set is an oracle early stop, which hides memorisation; SAT's
# published figures are last-epoch figures)


@dataclass
class SourceConfig(RunSettings):
    data: str = "builtin:digits/fonts"
    backbone: str = "dtn"
    num_classes: int | None = None
    classes: tuple[int, ...] | None = None   # train on these labels of the data only (an open-set source's known classes)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    holdout: float = 0.1                   # fraction held out for selection when there is no `select_on`
    select_on: str | None = None           # selection data; default: the val split of built-in domains
    selection_checks: int = 10             # how many times over the run the selection accuracy is checked
    keep: str = "best"                     # best: the best check (official protocol); last: the final model
    pretrained: str | None = None          # torchvision weights file for a ResNet backbone
    init_from: str | None = None           # or a source/adapted checkpoint whose backbone (same kind) to start from
    backbone_lr_mult: float | None = None  # default: 0.1 with pretrained weights, else 1
    transform: str | None = None           # digits | imagenet; default from the data
    eval_target: str | None = None         # report accuracy on this data at the end
    objective: str = "ce"                  # one of objectives.OBJECTIVES
    label_noise: float = 0.0               # fraction of training labels corrupted (exactly), for experiments
    noise_type: str = "symmetric"          # symmetric | pairflip
    resume: bool = False                   # continue from run_dir/train-state.pt


def check_source_config(cfg: SourceConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if cfg.noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {cfg.noise_type!r}: choose one of {', '.join(NOISE_TYPES)}")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ValueError(f"--label-noise must be in [0, 1), got {cfg.label_noise}")
    if cfg.classes is not None and len(set(cfg.classes)) < 2:
        raise ValueError(f"--classes {cfg.classes}: a source model needs at least two classes")
    if cfg.pretrained and cfg.init_from:
        raise ValueError("--pretrained and --init-from both give the backbone's starting weights: pass one")
    if cfg.keep not in KEEP_CHOICES:
        raise ValueError(f"unknown --keep {cfg.keep!r}: choose best (the best selection check) or last (the final "
                         f"model)")
    if cfg.resume and not cfg.run_dir:
        raise ValueError("--resume continues the run in --out: give the run directory")


def with_noisy_labels(dataset, rate: float, noise_type: str, seed: int):
    """A copy of a training set (or of the data set under a Subset) whose labels are corrupted; the copy
    keeps the true labels as `clean_labels`. The original, which selection may share, is left clean."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    noisy = copy.copy(base)
    noisy.clean_labels = base.labels
    noisy.labels = corrupt_labels(base.labels, rate, base.num_classes, noise_type, seed)
    return Subset(noisy, dataset.indices) if isinstance(dataset, Subset) else noisy


def default_selection(data: str) -> tuple[str, str] | None:
    """(data to fit, data to select on) for a built-in digits domain named without a split or as train or
    trainval: fit on its train split, select on its val split. None for any other data."""
    if not data.startswith("builtin:"):
        return None
    domain, split = parse_builtin(data)
    if split not in ("train", "trainval"):
        return None
    return f"builtin:digits/{domain}:train", f"builtin:digits/{domain}:val"


def check_disjoint(data: str, select_on: str) -> None:
    """A selection set inside the training data would choose the checkpoint on samples it was fit on."""
    if data.startswith("builtin:") and select_on.startswith("builtin:"):
        (d_domain, d_split), (s_domain, s_split) = parse_builtin(data), parse_builtin(select_on)
        contains = digits.split_contains
        if d_domain == s_domain and (contains(d_split, s_split) or contains(s_split, d_split)):
            raise ValueError(f"--select-on {select_on} overlaps --data {data}: select on "
                             f"builtin:digits/{s_domain}:val and train on builtin:digits/{d_domain}:train")
    elif data == select_on:
        raise ValueError(f"--select-on is the training data {data}: pass held-out data, or leave it out to hold "
                         f"out 10% of --data")


def selection_sets(cfg: SourceConfig, style: str):
    """(training set, selection set, name of the selection data) as the config asks: built-in digits fit on
    train and select on val (the digits benchmark passes its test split, SHOT's digits protocol), other
    data hold out `holdout` of itself unless `select_on` is given."""
    data, select_on = cfg.data, cfg.select_on
    if select_on is None and (builtin := default_selection(data)):
        data, select_on = builtin
    def load(spec: str, train: bool, num_classes: int | None):
        dataset = load_dataset(spec, image_transform(style, train=train), num_classes)
        return class_subset(dataset, cfg.classes) if cfg.classes else dataset   # open-set sources: known classes

    eval_set = load(data, False, cfg.num_classes)
    # digits use the same (deterministic) transform for training: share the prepared data set
    train_set = eval_set if style == "digits" else load(data, True, cfg.num_classes)
    if select_on:
        check_disjoint(data, select_on)
        selection = load(select_on, False, None if cfg.classes else train_set.num_classes)
        return train_set, selection, select_on
    fit_idx, hold_idx = split_holdout(len(train_set), cfg.holdout, cfg.seed)
    return Subset(train_set, fit_idx), Subset(eval_set, hold_idx), f"{cfg.holdout:.0%} of {cfg.data}"


def train_source(cfg: SourceConfig, dist: Distributed = SINGLE) -> dict:
    check_source_config(cfg)
    seed_everything(dist.seed(cfg.seed))  # data order and dropout differ per rank; the model is rank 0's
    rt = Runtime.create(cfg.device, "fp32", distributed=dist)
    style = cfg.transform or default_style(cfg.data)
    # rank 0 builds any data cache, the others then read it; a problem with the data stops every rank alike
    train_set, selection_set, selection_name = dist.main_first(lambda: selection_sets(cfg, style), INPUT_ERRORS)
    num_classes = (train_set.dataset if isinstance(train_set, Subset) else train_set).num_classes
    if cfg.label_noise > 0:
        train_set = with_noisy_labels(train_set, cfg.label_noise, cfg.noise_type, cfg.seed)
    base_train = train_set.dataset if isinstance(train_set, Subset) else train_set

    backbone_kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    if cfg.objective == "cifs-at":  # CIFS blocks after the last stage; adapters rebuild them from the config
        backbone_kwargs["cifs_classes"] = num_classes
    config = model_config(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs, transform=style)
    config["classes"] = list(cfg.classes) if cfg.classes else None   # the data labels the outputs stand for
    # the network its config records (the digit bottleneck's dropout included), with the pretrained weights loaded
    model = rt.prepare_module(ShotModel(cfg.backbone, num_classes, backbone_kwargs=backbone_kwargs,
                                        bottleneck_dropout=config["bottleneck_dropout"]))
    if cfg.init_from:
        load_backbone_from(model, cfg.init_from, cfg.backbone)
    dist.broadcast_module(model)
    model = synchronise_batch_norm(model, rt)
    objective = build_objective(cfg.objective, model, style=style, num_classes=num_classes,
                                train_labels=base_train.labels, epochs=cfg.epochs,
                                label_smoothing=cfg.label_smoothing, dist=dist)
    for module in objective.modules.values():
        dist.broadcast_module(module)
    starts_trained = bool(cfg.pretrained or cfg.init_from)
    backbone_mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (0.1 if starts_trained else 1.0)
    optimizer = shot_optimizer([(model.backbone, backbone_mult), (model.bottleneck, 1.0), (model.classifier, 1.0),
                                *((m, 1.0) for m in objective.modules.values())], cfg.lr, cfg.weight_decay)
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, dist=dist, seed=cfg.seed)
    selection_loader = make_loader(selection_set, 256, train=False, workers=cfg.workers, dist=dist)

    run_dir = cfg.run_dir or str(Path("runs") / default_run_name("source", cfg.backbone, f"s{cfg.seed}"))
    run_dir = Path(dist.gather_objects(run_dir)[0])  # rank 0's name (time stamps may differ)
    distributed = {"world_size": dist.world_size, "effective_batch_size": cfg.batch_size * dist.world_size}
    total_iters = cfg.epochs * len(loader)
    selection = Selection(total_iters, cfg.selection_checks, "selection_accuracy", selection_name, len(loader),
                          cfg.keep)
    first_step = 1
    if cfg.resume:
        state = load_checkpoint(run_dir / TRAIN_STATE, kind=TRAIN_STATE_KIND, map_location=rt.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        selection.best, first_step = state["best"], state["step"] + 1
        set_rng_state(state["rng"][dist.rank] if dist.enabled else state["rng"][0])
    if dist.is_main:
        write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "distributed": distributed})
    logger = run_logger(dist.is_main, run_dir, total=total_iters, initial=first_step - 1,
                        desc=f"source {cfg.backbone}", progress=cfg.progress,
                        purge_step=first_step if cfg.resume else None)
    # a resumed run starts a new pass over the data, in the order of the pass it was in
    batches, start = forever(loader, start_epoch=(first_step - 1) // len(loader)), time.time()
    try:
        model.train()
        for step in range(first_step, total_iters + 1):
            images, labels, index = next(batches)
            lr = set_shot_lr(optimizer, cfg.lr, step / total_iters)
            loss, terms = objective.loss(rt.images(images), labels.to(rt.device), index, (step - 1) // len(loader))
            take_step(optimizer, loss, dist)
            if step % 20 == 0:
                logger.scalars("source", {"loss": loss.item(), "lr": lr, **{k: float(v) for k, v in terms.items()}},
                               step)
            logger.advance(1)
            if selection.due(step):
                average_batch_norm_statistics(model, dist)  # CPU ranks: one model to check and save
                out = predict(model, selection_loader, rt)
                checked = {"selection_accuracy": accuracy(out["probs"].argmax(1), out["labels"])}
                if cfg.objective in ADVERSARIAL:
                    checked = {"clean_selection_accuracy": checked["selection_accuracy"],
                               **robust_selection(model, selection_set, objective, style, rt)}
                    checked["selection_accuracy"] = checked["robust_accuracy"]
                if cfg.label_noise > 0:
                    checked["fits_noisy_labels"] = noisy_fit(model, train_set, rt)
                logger.scalars("source", checked, step)
                if selection.keeps(checked, step) and dist.is_main:
                    save_checkpoint(run_dir / CHECKPOINT, SOURCE_KIND, {
                        "model_config": config, "model": model.state_dict(), "source_data": cfg.data,
                        "objective": cfg.objective, "objective_state": objective.state_dict(), **selection.best})
                save_training_state(run_dir, model, optimizer, objective, step, selection.best, dist)
    finally:
        logger.close()
    metrics = {"source_data": cfg.data, "backbone": cfg.backbone, "num_classes": num_classes, **selection.best,
               "objective": cfg.objective, "label_noise": cfg.label_noise, "noise_type": cfg.noise_type,
               "wall_seconds": time.time() - start, "checkpoint": str(run_dir / CHECKPOINT),
               "distributed": distributed}
    if dist.is_main:
        if cfg.eval_target:
            from .evaluate import evaluate_model

            metrics["target"] = evaluate_model(run_dir / CHECKPOINT, cfg.eval_target, device=cfg.device)
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def load_backbone_from(model: ShotModel, path, backbone: str) -> None:
    """Start `model`'s backbone from the backbone of a source or adapted checkpoint (a pretrained encoder for
    any registry backbone); the bottleneck and classifier start fresh, as on top of torchvision weights."""
    from .model import MODEL_KINDS

    state = load_checkpoint(path, kind=MODEL_KINDS, map_location="cpu")
    trained = state["model_config"]
    if trained["backbone"] != backbone or trained["backbone_kwargs"].get("cifs_classes"):
        raise ValueError(f"--init-from {path} holds a {trained['backbone']} backbone"
                         f"{' with CIFS blocks' if trained['backbone_kwargs'].get('cifs_classes') else ''}, "
                         f"this run builds a plain {backbone}: pass --backbone {trained['backbone']} or another "
                         f"checkpoint")
    weights = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    model.backbone.load_state_dict(weights)


def save_training_state(run_dir: Path, model, optimizer, objective, step: int, best: dict, dist: Distributed) -> None:
    """Everything `resume` needs to continue after `step` (every rank's RNG state travels to rank 0)."""
    rngs = dist.gather_objects_to_main(rng_state())
    if dist.is_main:
        save_checkpoint(run_dir / TRAIN_STATE, TRAIN_STATE_KIND, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "objective": objective.state_dict(),
            "step": step, "best": best, "rng": rngs})


def robust_selection(model, selection_set, objective, style: str, rt: Runtime) -> dict:
    """Clean and PGD-EVAL_STEPS accuracy on the first ROBUST_SLICE selection samples (the same on every rank).
    CIFS models are attacked through their joint loss, as the CIFS code evaluates them."""
    slice_ = Subset(selection_set, range(min(ROBUST_SLICE, len(selection_set))))
    loader = torch.utils.data.DataLoader(slice_, batch_size=256)
    loss_of = None
    if objective.name == "cifs-at":
        def loss_of(images, labels):
            return cifs_joint_loss(model(images), model.backbone.probe_logits, labels)
    report = robust_accuracy(model, loader, evaluation_attack(steps=EVAL_STEPS), style, rt.device, loss_of=loss_of)
    return {"robust_accuracy": report["robust_accuracy"], "robust_clean_accuracy": report["clean_accuracy"]}


@torch.no_grad()
def noisy_fit(model, train_set, rt: Runtime, limit: int = 2048) -> float:
    """% of the (first `limit`) corrupted training samples whose noisy label the model predicts: memorisation."""
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    indices = train_set.indices if isinstance(train_set, Subset) else range(len(train_set))
    wrong = [i for i in indices if base.labels[i] != base.clean_labels[i]][:limit]
    if not wrong:
        return 0.0
    loader = torch.utils.data.DataLoader(Subset(base, wrong), batch_size=256)
    was_training = model.training
    model.eval()
    hits = 0
    for images, labels, _ in loader:
        hits += int((model(rt.images(images)).argmax(1).cpu() == labels).sum())
    model.train(was_training)
    return 100.0 * hits / len(wrong)
