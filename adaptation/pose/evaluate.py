"""PCK, per-joint PCK and COCO OKS AP of a pose checkpoint (source or adapted) on keypoint data.

    result = evaluate_pose_model("runs/pose-src/source.pt", "builtin:figures/textured:test",
                                 results_json="runs/pose-src/keypoints.json")

Top-down with the annotated boxes: every labelled person is cropped as in evaluation mode of
`KeypointDataset`, its heatmaps are decoded (argmax + quarter-pixel shift; with `flip_test` the
heatmaps of the mirrored crop are flipped back, shifted right by 1 - 1/stride (0.75 px, where HRNet
shifts 1: `keypoints.flip_shift`) and averaged in, as HRNet tests)
and mapped back to image pixels through the inverse crop affine. Metrics (REFERENCE 8.6):
PCK@0.05 and PCK@0.1 normalised by max(box w, h) over labelled joints (mean of per-joint
accuracies), and AP / AP50 / AP75 through pycocotools' COCOeval on the evaluated persons' annotations,
with the data's per-joint OKS sigmas (COCO's for 17 COCO joints, the figures' for the built-in
set, COCO's mean otherwise). The result score of a person is the mean of its heatmap maxima.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from workbench.runtime import Runtime

from . import figures
from .keypoints import (COCO_SIGMAS, coco_results, decode_heatmaps, flip_heatmaps_back, flip_shift, oks_ap, pck,
                        transform_points)
from ..dense.model import load_dense_model
from .data import KeypointDataset

TASK = "pose"
EVAL_BATCH = 64
PCK_THRESHOLDS = (0.05, 0.1)


def oks_sigmas(dataset: KeypointDataset) -> np.ndarray:
    if dataset.source.builtin:
        return np.asarray(figures.SIGMAS, dtype=np.float64)
    if dataset.num_joints == len(COCO_SIGMAS):
        return np.asarray(COCO_SIGMAS, dtype=np.float64)
    return np.full(dataset.num_joints, float(np.mean(COCO_SIGMAS)))


def load_pose_data(spec: str, model_config: dict, train: bool = False) -> KeypointDataset:
    """Keypoint data cropped at the model's input size; a joint count other than the model's is a DataError."""
    size = model_config.get("image_size")
    return KeypointDataset(spec, train=train, num_joints=model_config["num_classes"],
                           input_size=tuple(size) if size else None)


@torch.no_grad()
def predict_heatmaps(model, images: torch.Tensor, runtime: Runtime, flip_pairs, flip_test: bool) -> torch.Tensor:
    """Heatmaps (N, K, h, w) in float32, averaged with the flipped-back heatmaps of the mirrored input."""
    x = runtime.images(images)
    with runtime.autocast():
        heatmaps = model(x).float()
        if flip_test:  # the mirrored crop's heatmaps sit 1 - 1/stride left of the plain ones once flipped back
            shift = flip_shift(x.shape[-1], heatmaps.shape[-1])
            heatmaps = (heatmaps + flip_heatmaps_back(model(torch.flip(x, dims=[3])).float(), flip_pairs, shift)) / 2
    return heatmaps


@torch.no_grad()
def predict_joints(model, dataset: KeypointDataset, runtime: Runtime, flip_test: bool = True,
                   batch_size: int = EVAL_BATCH, workers: int = 0) -> dict[str, np.ndarray]:
    """Joints (N, K, 2) in image pixels and heatmap maxima (N, K) for every person of `dataset` (in order)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    joints, maxima = [], []
    for batch in loader:
        heatmaps = predict_heatmaps(model, batch["image"], runtime, dataset.flip_pairs, flip_test)
        coords, maxvals = decode_heatmaps(heatmaps.cpu())
        for j, i in enumerate(batch["index"].tolist()):
            inverse = np.linalg.inv(np.vstack([dataset.heatmap_matrix(i), [0.0, 0.0, 1.0]]))[:2]
            joints.append(transform_points(coords[j].double().numpy(), inverse))
        maxima.append(maxvals.numpy())
    model.train(was_training)
    return {"joints": np.stack(joints), "maxvals": np.concatenate(maxima)}


def pose_scores(prediction: dict[str, np.ndarray], dataset: KeypointDataset) -> dict:
    """PCK@0.05/0.1 (+ per joint) and COCO AP of predicted joints against the dataset's annotations."""
    gt = dataset.ground_truth()
    normaliser = np.maximum(gt["boxes"][:, 2], gt["boxes"][:, 3])
    scores = pck(prediction["joints"], gt["joints"], gt["visible"], normaliser, PCK_THRESHOLDS)
    results = coco_results(gt["image_ids"].tolist(), prediction["joints"], prediction["maxvals"].mean(1).tolist())
    ap = oks_ap(coco_object(dataset.coco_ground_truth()), results, oks_sigmas(dataset))
    return {**scores, "ap": ap["AP"], "ap50": ap["AP50"], "ap75": ap["AP75"], "coco": ap, "results": results}


def coco_object(dataset: dict):
    """A pycocotools COCO index over an in-memory dict (no file, no prints)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def public_pose_scores(scores: dict, prefix: str = "") -> dict:
    """The JSON part of a pass's scores (no per-person results), keys optionally prefixed."""
    return {f"{prefix}{k}": v for k, v in scores.items() if k != "results"}


def draw_skeletons(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, visible: np.ndarray,
                   skeleton, scale: int = 2) -> np.ndarray:
    """The image (upscaled) with the true skeleton in green and the predicted one in red."""
    canvas = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for joints, colour, only_labelled in ((truth, (40, 220, 60), True), (pred, (235, 40, 40), False)):
        for a, b in skeleton:
            if not only_labelled or (visible[a] and visible[b]):
                draw.line([tuple(joints[a] * scale), tuple(joints[b] * scale)], fill=colour, width=2)
        for k, (x, y) in enumerate(joints * scale):
            if not only_labelled or visible[k]:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return np.asarray(canvas)


def skeleton_panel(dataset: KeypointDataset, joints: np.ndarray, indices) -> np.ndarray:
    """The persons `indices`' images with true (green) and predicted (red) skeletons, side by side."""
    gt = dataset.ground_truth()
    skeleton = figures.SKELETON if dataset.source.builtin else skeleton_of(dataset)
    tiles = []
    for i in indices:
        image = (dataset.load_image(i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tiles.append(draw_skeletons(image, gt["joints"][i], joints[i], gt["visible"][i], skeleton))
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    return np.concatenate(padded, axis=1)


def skeleton_of(dataset: KeypointDataset) -> list[tuple[int, int]]:
    """The 0-based limb pairs of a COCO file's category (COCO stores them 1-based)."""
    categories = json.loads(dataset.source.annotations.read_text())["categories"]
    pairs = next((c.get("skeleton") for c in categories if c.get("keypoints")), None) or []
    return [(a - 1, b - 1) for a, b in pairs]


def evaluate_pose_model(path, data: str, device: str = "auto", flip_test: bool = True, results_json=None,
                        workers: int = 0) -> dict:
    rt = Runtime.create(device, "fp32")
    model, state = load_dense_model(path, rt, task=TASK)
    dataset = load_pose_data(data, state["model_config"])
    scores = pose_scores(predict_joints(model, dataset, rt, flip_test, workers=workers), dataset)
    if results_json:  # a COCO result file: a plain list of entries
        Path(results_json).parent.mkdir(parents=True, exist_ok=True)
        Path(results_json).write_text(json.dumps(scores["results"]))
    return {"task": TASK, "data": data, "persons": len(dataset), "flip_test": flip_test,
            "joint_names": list(dataset.joint_names), **public_pose_scores(scores)}
