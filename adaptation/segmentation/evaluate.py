"""mIoU, per-class IoU and pixel accuracy of a segmentation checkpoint (source or adapted) on a data set.

    result = evaluate_dense_model("runs/src/source.pt", "builtin:scenes/textured:test",
                                  save_predictions="runs/src/predictions")

Scores follow adaptation.segmentation.metrics: one confusion matrix over the whole set (ignore 255 dropped),
mIoU over the classes present in truth or prediction. Predictions are argmax of the logits at input
resolution (no flip or multi-scale testing). `save_predictions` writes one palette PNG per image,
<dir>/<name>.png, whose pixel values are the predicted classes (colorize's palette).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from workbench.heads import resize
from workbench.runtime import Runtime

from ..dense.model import load_dense_model
from .data import SegmentationDataset, load_segmentation
from .metrics import ConfusionAccumulator, colorize

TASK = "segmentation"
EVAL_BATCH = 16


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
