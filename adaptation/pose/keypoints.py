"""Keypoint geometry, heatmap targets and decoding, and pose metrics (PCK, OKS, COCO AP).

Conventions: points are (x, y) with pixel centres at integer coordinates (cv2.warpAffine's, which
HRNet's and SimpleBaseline's top-down crops use); sizes are (width, height).

- Crop: a person box is grown to the input aspect ratio and by 1.25 (`box_to_center_scale`);
  the 2x3 affine maps the window of that size centred on the box, turned by `rotation` degrees
  (counter-clockwise positive, as HRNet's get_affine_transform), onto the output so that the
  window's centre lands on the output's centre (w/2, h/2) and its edges on the output's edges.
- Targets: un-normalised Gaussians exp(-d^2 / 2 sigma^2) at the sub-pixel joint, sigma 2 at a
  48 x 64 heatmap, scaled with the heatmap height; a joint whose 3-sigma square lies wholly
  outside the map, or that is not labelled, gets weight 0 (HRNet's rule).
- Heatmap frame: a heatmap pixel x_hm is the input pixel x_in = stride * x_hm (HRNet's targets are
  input joints / feat_stride), mirrored views included: a crop mirrored as x_in -> iw - 1 - x_in
  puts a joint at x_hm -> hw - 1/stride - x_hm in the heatmap, not at hw - 1 - x_hm.
- Decoding: the argmax, then a quarter pixel toward the higher neighbour in x and in y (HRNet's
  get_final_preds). Flip testing mirrors the flipped input's heatmaps back, swaps left/right
  channels and shifts them right by 1 - 1/stride (`flip_shift`, 0.75 px at stride 4) by linear
  interpolation; HRNet's shift_heatmap moves them a whole pixel.
- Metrics (REFERENCE 8.6): PCK@a counts a labelled joint correct when its error / max(box w, h)
  < a, averaged per joint then over joints; OKS is pycocotools' formula; AP is COCOeval's.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch

# COCO's per-joint OKS sigmas (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles)
COCO_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87,
                        0.89, 0.89]) / 10.0
BOX_PADDING = 1.25


# ------------------------------------------------------------------ geometry
def box_to_center_scale(box_xywh, aspect_ratio: float, padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """COCO box [x, y, w, h] -> centre (2,) and crop window (w, h) in image pixels at `aspect_ratio` = w/h."""
    values = list(box_xywh) if box_xywh is not None else []
    if len(values) < 4 or not all(math.isfinite(float(v)) for v in values[:4]) or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"box {values} is malformed (need [x, y, w, h] with w > 0 and h > 0)")
    x, y, w, h = (float(v) for v in values[:4])
    center = np.array([x + w / 2.0, y + h / 2.0])
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h]) * padding


def affine_matrix(center, size, rotation: float, output_size: tuple[int, int], inverse: bool = False) -> np.ndarray:
    """2x3 matrix: image pixels -> output pixels (or back with `inverse`); see the module docstring."""
    center, size = np.asarray(center, dtype=np.float64), np.asarray(size, dtype=np.float64)
    out_w, out_h = output_size
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    # x_out = S R (x - c) + o with S = diag(out_w / w, out_h / h) and R turning counter-clockwise on screen
    rot = np.array([[cos, sin], [-sin, cos]])
    linear = np.diag([out_w / size[0], out_h / size[1]]) @ rot
    offset = np.array([out_w / 2.0, out_h / 2.0]) - linear @ center
    matrix = np.hstack([linear, offset[:, None]])
    if inverse:
        matrix = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 2x3 affine."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def flip_keypoints(keypoints: np.ndarray, width: int, flip_pairs) -> np.ndarray:
    """Mirror (K, 2) or (K, 3) keypoints in an image `width` wide and swap left/right pairs (its own inverse)."""
    out = np.array(keypoints, dtype=np.float64, copy=True)
    out[:, 0] = width - 1 - out[:, 0]
    for a, b in flip_pairs:
        out[[a, b]] = out[[b, a]]
    return out


def flip_shift(input_width: int, heatmap_width: int) -> float:
    """How far right a mirrored input's heatmaps, mirrored back, must move to meet the plain input's.

    With r = heatmap_width / input_width (1 / stride), a joint at input x sits at r x in the heatmap; the
    mirrored input holds it at iw - 1 - x, its heatmap at r (iw - 1 - x) = hw - r - r x, and torch.flip
    brings column c to hw - 1 - c, i.e. r x - (1 - r): 1 - r short of the plain heatmap's peak."""
    return 1.0 - heatmap_width / input_width


def flip_heatmaps_back(heatmaps: torch.Tensor, flip_pairs, shift: float = 0.0) -> torch.Tensor:
    """Heatmaps predicted on a mirrored input -> the original frame: mirror, swap pairs, then move `shift`
    (0..1) pixels right by linear interpolation (the first column keeps its value; shift 1 is HRNet's)."""
    out = torch.flip(heatmaps, dims=[-1])
    order = list(range(out.shape[1]))
    for a, b in flip_pairs:
        order[a], order[b] = b, a
    out = out[:, order]
    if shift:
        left = torch.cat([out[..., :1], out[..., :-1]], dim=-1)   # each column's left neighbour
        out = (1.0 - shift) * out + shift * left
    return out


# ------------------------------------------------------------------ targets and decoding
def heatmap_sigma(heatmap_size: tuple[int, int]) -> float:
    """2 at a 48 x 64 heatmap, proportional to the heatmap height."""
    return 2.0 * heatmap_size[1] / 64.0


def gaussian_heatmaps(joints: np.ndarray, visible: np.ndarray, heatmap_size: tuple[int, int], sigma: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) float32 Gaussians with peak 1 at the joints (heatmap pixels) and (K,) float32 weights."""
    width, height = heatmap_size
    joints = np.asarray(joints, dtype=np.float64)
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    heatmaps = np.zeros((len(joints), height, width), np.float32)
    weights = np.asarray(visible, dtype=np.float32).copy()
    reach = 3 * sigma
    for k, (x, y) in enumerate(joints):
        if weights[k] <= 0 or not (np.isfinite(x) and np.isfinite(y)):
            weights[k] = 0.0
            continue
        if x + reach < 0 or y + reach < 0 or x - reach > width - 1 or y - reach > height - 1:
            weights[k] = 0.0  # the Gaussian lies wholly outside the map
            continue
        gx, gy = np.exp(-((xs - x) ** 2) / (2 * sigma**2)), np.exp(-((ys - y) ** 2) / (2 * sigma**2))
        heatmaps[k] = np.outer(gy, gx)
    return heatmaps, weights


def decode_heatmaps(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, H, W) -> (x, y) in heatmap pixels (N, K, 2) and maxima (N, K)."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w).float()
    maxvals, index = flat.max(dim=2)
    x, y = index % w, torch.div(index, w, rounding_mode="floor")

    def at(yy, xx):
        return flat.gather(2, (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1))[..., None]).squeeze(-1)

    # a quarter pixel toward the higher neighbour, where both neighbours exist
    dx = torch.sign(at(y, x + 1) - at(y, x - 1)) * 0.25 * ((x > 0) & (x < w - 1))
    dy = torch.sign(at(y + 1, x) - at(y - 1, x)) * 0.25 * ((y > 0) & (y < h - 1))
    coords = torch.stack([x.float() + dx, y.float() + dy], dim=-1)
    return coords, maxvals


# ------------------------------------------------------------------ metrics
def pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, normaliser: np.ndarray,
        thresholds=(0.05, 0.1)) -> dict:
    """PCK@a in % (mean of per-joint accuracies over joints labelled at least once) and per-joint PCK."""
    error = np.linalg.norm(np.asarray(pred, float) - np.asarray(gt, float), axis=-1)
    relative = error / np.maximum(np.asarray(normaliser, float), 1e-12)[:, None]
    visible = np.asarray(visible, bool)
    counts = visible.sum(0)
    out = {}
    for a in thresholds:
        correct = ((relative < a) & visible).sum(0)
        per_joint = np.where(counts > 0, 100.0 * correct / np.maximum(counts, 1), np.nan)
        out[f"pck@{a}"] = float(np.nanmean(per_joint)) if (counts > 0).any() else float("nan")
        out[f"per_joint_pck@{a}"] = [float(v) for v in per_joint]
    return out


def oks(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, area: np.ndarray, sigmas) -> np.ndarray:
    """pycocotools' object keypoint similarity per instance (N,)."""
    d2 = ((np.asarray(pred, float) - np.asarray(gt, float)) ** 2).sum(-1)
    k2 = (2 * np.asarray(sigmas, float)) ** 2
    e = d2 / (2 * np.asarray(area, float)[:, None] * k2[None])   # pycocotools: d^2 / vars / (area + eps) / 2
    visible = np.asarray(visible, bool)
    return (np.exp(-e) * visible).sum(1) / np.maximum(visible.sum(1), 1)


def coco_results(image_ids, keypoints: np.ndarray, scores, category_id: int = 1) -> list[dict]:
    """COCO keypoint result entries (x, y, 1 per joint) for (N, K, 2) keypoints in image pixels."""
    out = []
    for image_id, kps, score in zip(image_ids, np.asarray(keypoints, float), scores):
        flat = np.concatenate([kps, np.ones((len(kps), 1))], axis=1).ravel()
        out.append({"image_id": int(image_id), "category_id": int(category_id),
                    "keypoints": [round(float(v), 3) for v in flat], "score": float(score)})
    return out


AP_NAMES = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")


def oks_ap(coco_gt, results: list[dict], sigmas) -> dict:
    """COCOeval(iouType="keypoints") with the given per-joint sigmas; stats in % (AP 0 for no results)."""
    return coco_stats(coco_gt, results, "keypoints", AP_NAMES, sigmas)


def coco_stats(coco_gt, results: list[dict], iou_type: str, names: tuple[str, ...], sigmas=None) -> dict:
    """pycocotools' COCOeval summary (`names` for its stats, in %; 0 for no results) of `results` against a
    COCO index or annotation file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in names}
    with contextlib.redirect_stdout(io.StringIO()):
        if not isinstance(coco_gt, COCO):
            coco_gt = COCO(str(coco_gt))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        if sigmas is not None:
            evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100.0 * float(max(v, 0.0)) for name, v in zip(names, evaluator.stats)}
