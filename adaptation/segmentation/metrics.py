"""Segmentation metrics: one confusion matrix over the whole evaluation set, and the scores read from it.

    confusion[t, p] = number of pixels of true class t predicted as p (rows = truth), counted as
                      bincount(K * truth + prediction) after dropping the pixels whose truth is the
                      ignore index (255), as mmsegmentation, HRNet and openseg do.
    IoU_c           = CM_cc / (row_c + col_c - CM_cc)
    mIoU            = mean of IoU_c over the classes present in the truth OR the prediction.

The mIoU convention: a class that neither occurs in the truth nor is ever predicted has no IoU
(0 / 0); it is left out of the mean (the nanmean of HCL-style code) and reported as None in
`per_class_iou`. HRNet's code instead counts such a class as 0 (it divides by max(1, union)), which
lowers the mean whenever an evaluation set lacks a class. A class that is predicted but absent
from the truth has IoU 0 and does count. All scores are percentages.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


def _flat(values):
    """A flat int64 tensor (kept on its device) from a tensor or array of labels."""
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).long()
    return torch.from_numpy(np.asarray(values).reshape(-1).astype(np.int64))


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, columns = prediction; pixels whose truth is `ignore_index`
    are dropped. `pred` and `target` are label maps of the same shape (tensors on any device, or arrays)."""
    pred, target = _flat(pred), _flat(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and truth differ in size: {pred.numel()} and {target.numel()} pixels")
    pred = pred.to(target.device)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel():
        bad_t = (target < 0) | (target >= num_classes)
        if bad_t.any():
            raise ValueError(f"truth label {int(target[bad_t][0])} is outside 0..{num_classes - 1} and not the "
                             f"ignore index {ignore_index}")
        bad_p = (pred < 0) | (pred >= num_classes)
        if bad_p.any():
            raise ValueError(f"predicted label {int(pred[bad_p][0])} is outside 0..{num_classes - 1}")
    counts = torch.bincount(num_classes * target + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def segmentation_scores(confusion: np.ndarray) -> dict:
    """mIoU, per-class IoU (None where a class is absent from truth and prediction), pixel accuracy and
    mean class accuracy (over the classes present in the truth), all in percent; plus the pixel count."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    total = cm.sum()
    if total == 0:
        raise ValueError("no labelled pixels to score: every pixel was ignored or nothing was evaluated")
    tp, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    union = rows + cols - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan) * 100
    in_truth = rows > 0
    return {
        "miou": float(np.mean(iou[present])),
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present)],
        "pixel_accuracy": float(tp.sum() / total * 100),
        "mean_class_accuracy": float(np.mean(tp[in_truth] / rows[in_truth]) * 100),
        "pixels": int(total),
    }


class ConfusionAccumulator:
    """Sums confusion matrices batch by batch; `scores()` reads the whole set's figures.

    `update(pred, target)` takes label maps (e.g. logits.argmax(1) and the masks of a batch)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred, target) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        self.confusion[:] = 0

    def scores(self) -> dict:
        return segmentation_scores(self.confusion)


# ------------------------------------------------------------------ drawing label maps
# background black, the ten digit classes in well-separated hues, ignore (255) white; any other
# label gets a colour from the PASCAL VOC bit-interleaving scheme.
_FIRST_COLOURS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def _voc_colour(index: int) -> tuple[int, int, int]:
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> 0) & 1) << (7 - shift)
        g |= ((index >> 1) & 1) << (7 - shift)
        b |= ((index >> 2) & 1) << (7 - shift)
        index >>= 3
    return r, g, b


def palette() -> list[int]:
    """The fixed 256-entry palette as a flat [r, g, b, ...] list."""
    colours = _FIRST_COLOURS + [_voc_colour(i) for i in range(len(_FIRST_COLOURS), 255)] + [(255, 255, 255)]
    return [v for colour in colours for v in colour]


_PALETTE = palette()


def colorize(mask) -> Image.Image:
    """A label map (H, W) as a PIL palette ('P') image: background black, ignore (255) white.

    Saved as PNG it keeps the label values themselves as pixel indices, so it reads back as a label map."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label map is (H, W), got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"labels {int(mask.min())}..{int(mask.max())} do not fit a palette image (0..255)")
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # "L"
    image.putpalette(_PALETTE)  # an "L" image becomes "P" with this palette
    return image
