"""Scoring a person detector: COCO box AP through pycocotools, on any data `BoxDataset` reads."""

from __future__ import annotations

import torch

from workbench.checkpoint import load_checkpoint, resolve_checkpoint_path
from workbench.runtime import Runtime

from ..pose.evaluate import coco_object
from ..pose.keypoints import coco_stats
from .data import BoxDataset, collate
from .model import build_detector

TASK = "detection"
SOURCE_KIND = "source-model"
EVAL_BATCH = 16
BOX_AP_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


@torch.no_grad()
def detect(detector, images: list[torch.Tensor], device) -> list[dict]:
    """Boxes (n, 4) x1 y1 x2 y2 and scores (n,) per image, as numpy arrays on the CPU."""
    was_training = detector.training
    detector.eval()
    out = detector([image.to(device) for image in images])
    detector.train(was_training)
    return [{"boxes": o["boxes"].cpu().numpy(), "scores": o["scores"].cpu().numpy()} for o in out]


def predict_boxes(detector, dataset: BoxDataset, device) -> list[dict]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, collate_fn=collate)
    predictions = []
    for images, _ in loader:
        predictions += detect(detector, images, device)
    return predictions


def box_results(dataset: BoxDataset, predictions: list[dict]) -> list[dict]:
    """COCO detection results ([x, y, w, h], score) of every predicted box."""
    results = []
    for frame, pred in zip(dataset.frames, predictions):
        for (x1, y1, x2, y2), score in zip(pred["boxes"].tolist(), pred["scores"].tolist()):
            results.append({"image_id": frame.image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    return results


def box_scores(dataset: BoxDataset, predictions: list[dict]) -> dict:
    """COCO box AP (AP, AP50, AP75 ... in %) of the predictions on the data set's frames."""
    stats = coco_stats(coco_object(dataset.coco_ground_truth()), box_results(dataset, predictions), "bbox",
                       BOX_AP_NAMES)
    return {"ap": stats["AP"], "ap50": stats["AP50"], "ap75": stats["AP75"], "coco": stats}


def load_detector(path, device: str = "cpu"):
    """(detector in eval mode, checkpoint) of a `train-source --task detection` run or checkpoint file."""
    file = resolve_checkpoint_path(path)
    state = load_checkpoint(file, kind=SOURCE_KIND)
    config = state.get("model_config", {})
    if config.get("task") != TASK:
        raise ValueError(f"{file} holds a {config.get('task', 'classification')} model, not a person detector: "
                         f"train one with `workbench train-source --task detection`")
    detector = build_detector(config)
    detector.load_state_dict(state["model"])
    return detector.to(device).eval(), state


def evaluate_detector(path, data: str, device: str = "auto") -> dict:
    rt = Runtime.create(device, "fp32")
    detector, _ = load_detector(path, rt.device)
    dataset = BoxDataset(data)
    scores = box_scores(dataset, predict_boxes(detector, dataset, rt.device))
    return {"task": TASK, "data": data, "frames": len(dataset),
            "people": int(sum(len(f.people) for f in dataset.frames)), **scores}
