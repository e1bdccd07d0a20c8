"""mIoU, per-class IoU and pixel accuracy of a segmentation checkpoint (source or adapted) on a data set.

    result = evaluate_dense_model("runs/src/source.pt", "builtin:scenes/textured:test",
                                  save_predictions="runs/src/predictions")

Scores follow adaptation.dense.metrics: one confusion matrix over the whole set (ignore 255 dropped),
mIoU over the classes present in truth or prediction. Predictions are argmax of the logits at input
resolution (no flip or multi-scale testing). `save_predictions` writes one palette PNG per image,
<dir>/<name>.png, whose pixel values are the predicted classes (colorize's palette).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from workbench.checkpoint import CheckpointError, load_checkpoint
from workbench.runtime import Runtime

from .data import SegmentationDataset, load_segmentation
from .heads import resize
from .metrics import ConfusionAccumulator, colorize
from .model import build_dense_model

MODEL_KINDS = ("source-model", "adapted-model")
TASK = "segmentation"
EVAL_BATCH = 16


def checkpoint_task(state: dict) -> str:
    """The task a model checkpoint names; checkpoints written before tasks existed are classification."""
    return state.get("task", "classification")


def load_dense_model(path, runtime, task: str = TASK):
    """(model in eval mode, checkpoint dict) of a dense checkpoint of `task` (segmentation or pose); any
    other task is a clear error."""
    state = load_checkpoint(path, kind=MODEL_KINDS, map_location=runtime.device)
    stored = checkpoint_task(state)
    if stored != task:
        raise CheckpointError(f"{path} holds a {stored} model, not a {task} model: pass a checkpoint from "
                              f"`train-source --task {task}` or use --task {stored}")
    model = runtime.prepare_module(build_dense_model(state["model_config"]))
    check_dense_state(path, state, model)
    model.load_state_dict(state["model"])
    return model.eval(), state


def check_dense_state(path, state: dict, model) -> None:
    """A one-line CheckpointError when the stored weights do not fit the model their config builds
    today: the one-conv fcn head of before issue 34 (keys head.conv.*), or any other change of layers."""
    stored, expected = set(state["model"]), set(model.state_dict())
    if stored == expected:
        return
    if state["model_config"].get("head") == "fcn" and any(k.startswith("head.conv.") for k in stored):
        raise CheckpointError(f"{path} holds an fcn model with the old one-conv head (head.conv.*); the fcn head is "
                              f"now mmsegmentation's (num_convs=2 3x3 convs + input concat), so retrain the "
                              f"source model with this version")
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    raise CheckpointError(f"{path} does not fit the {state['model_config'].get('head')} model its config builds "
                          f"today: {len(missing)} missing state entries ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
                          f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); retrain it")


def load_dense_target(spec: str, model_config: dict) -> SegmentationDataset:
    """Evaluation-transformed data whose labels must fit the model's classes (a mismatch is a DataError)."""
    return load_segmentation(spec, num_classes=model_config["num_classes"], train=False)


def eval_batch_size(dataset, batch_size: int) -> int:
    """Whole images batch only when they share one size: the built-in scenes do, user images may not (batch 1)."""
    base = getattr(dataset, "dataset", dataset)
    return batch_size if getattr(base, "images", None) is not None else 1


def eval_loader(dataset, batch_size: int = EVAL_BATCH, workers: int = 0) -> DataLoader:
    """Evaluation keeps each image whole and in order."""
    return DataLoader(dataset, batch_size=eval_batch_size(dataset, batch_size), shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0)


@torch.no_grad()
def segmentation_pass(model, loader: DataLoader, runtime, num_classes: int, save_dir=None, names=None,
                      on_batch=None) -> dict:
    """Scores of argmax predictions over a loader (eval mode; the model's mode is restored).

    `save_dir`: write <save_dir>/<names[i]>.png palette label maps. `on_batch(images, masks, idx, z, logits)`
    sees every batch's pixel features z (N, D, h, w) and input-resolution logits, so that a caller can
    sample features or draw panels in the same pass."""
    was_training = model.training
    model.eval()
    acc = ConfusionAccumulator(num_classes)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    for images, masks, idx in loader:
        x = runtime.images(images)
        with runtime.autocast():
            z = model.pixel_features(x)
            logits = resize(model.classifier(z), x.shape[-2:]).float()  # exactly model(x), with z kept
        z = z.float()
        pred = logits.argmax(1)
        acc.update(pred, masks.to(pred.device))
        if on_batch is not None:
            on_batch(images, masks, idx, z, logits)
        if save_dir is not None:
            for p, i in zip(pred.cpu(), idx.tolist()):
                colorize(p).save(Path(save_dir) / f"{names[i]}.png")
    model.train(was_training)
    return {**acc.scores(), "confusion": acc.confusion.copy()}


def public_scores(scores: dict, prefix: str = "") -> dict:
    """The JSON part of a pass's scores (no confusion matrix), keys optionally prefixed."""
    keys = ("miou", "per_class_iou", "pixel_accuracy", "mean_class_accuracy")
    return {f"{prefix}{k}": scores[k] for k in keys}


def evaluate_dense_model(path, data: str, device: str = "auto", batch_size: int = EVAL_BATCH,
                         save_predictions: str | None = None, workers: int = 0) -> dict:
    rt = Runtime.create(device, "fp32")
    model, state = load_dense_model(path, rt)
    dataset = load_dense_target(data, state["model_config"])
    scores = segmentation_pass(model, eval_loader(dataset, batch_size, workers), rt, dataset.num_classes,
                               save_dir=save_predictions, names=dataset.names)
    out = {"task": TASK, "data": data, "images": len(dataset), **public_scores(scores),
           "class_names": dataset.class_names}
    if save_predictions:
        out["predictions"] = str(save_predictions)
    return out
