"""PoseTrack's multi-person pose tracking metrics (poseval: MOTA, MOTP, precision, recall per joint; AP per joint).

Follows leonid-pishchulin/poseval (py/eval_helpers.py assignGTmulti, computeRPC, VOCap; py/evaluateTracking.py;
py/evaluateAP.py), with py-motmetrics doing the tracking counts as poseval does.

- Matching rule (PCKh@0.5): a predicted joint can match a ground-truth joint of the same type when their
  distance over the head size is at most 0.5, the head size being 0.6 x the diagonal of the person's head box
  (poseval's getHeadSize). Ground-truth joints with v = 0 are not annotated and take no part.
- Tracking (MOT): for each joint type one `mm.MOTAccumulator` per video; each frame it gets the ground-truth
  and predicted track ids that have that joint and the distance d / head size for the pairs within the
  threshold, NaN (no match possible) for the others; motmetrics matches them over time (keeping last frame's
  matches, then minimising the total distance) and counts misses, false positives and identity switches.
  Per joint: MOTA = 100 (1 - (misses + switches + false positives) / ground-truth joints), MOTP = 100 (1 - mean
  matched d / head size) (poseval's; 0 for a joint with no match, as poseval), precision = 100 matches /
  (matches + false positives), recall = 100 matches / ground-truth joints; counts are summed over videos
  before these ratios, and "total" is the mean over the joints that have a value, as poseval reports.
- AP: per frame, predicted persons are assigned one-to-one to ground-truth persons by their PCKh (the fraction
  of the ground truth's annotated joints that they match); poseval assigns greedily by argmax, here the
  Hungarian algorithm maximises the summed PCKh. A joint of an assigned prediction is a true positive when it
  matches its ground truth's joint, every other predicted joint a false positive; per joint over all frames,
  sorted by score, AP is the area under the precision-recall curve with poseval's VOC rule (precision made
  monotone from the right, summed over the recall steps).

Where this differs from poseval on purpose: a frame with no prediction or no ground truth counts its misses or
false positives (poseval's tracking reuses the previous frame's entry there), and the last frame of a video is
evaluated (poseval's tracking skips it). Predicted joints scored below `score_threshold` are dropped from the
tracking metrics only (poseval takes the joints as submitted, so this is the submitters' step: a pipeline that
outputs low-confidence joints pays false positives for them in MOTA; AP uses every joint, since it ranks by
score). The default 0.0 keeps all joints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import motmetrics as mm
import numpy as np
from scipy.optimize import linear_sum_assignment

# poseval: distThresh = 0.5 (PCKh@0.5) and getHeadSize = 0.6 x the head box's diagonal
PCKH_THRESHOLD = 0.5
HEAD_SIZE_FACTOR = 0.6
# motmetrics' counts that poseval's formulas are made of
MOT_COUNTS = ["num_misses", "num_switches", "num_false_positives", "num_objects", "num_detections", "motp"]


# ------------------------------------------------------------------ one frame
def head_size(bbox_head) -> float:
    """poseval's getHeadSize: 0.6 x the diagonal of the head box [x, y, w, h]."""
    _, _, w, h = (float(v) for v in bbox_head)
    return HEAD_SIZE_FACTOR * float(np.hypot(w, h))


def _keypoints(person: Mapping, num_joints: int) -> np.ndarray:
    """A person's keypoints as (J, 3) float (x, y, v or score); (J, 2) gets score 1."""
    kps = np.asarray(person["keypoints"], dtype=np.float64)
    if kps.ndim == 1:
        kps = kps.reshape(num_joints, -1)
    if kps.shape[0] != num_joints or kps.shape[1] not in (2, 3):
        raise ValueError(f"keypoints of shape {kps.shape}: expected ({num_joints}, 3)")
    if kps.shape[1] == 2:
        kps = np.concatenate([kps, np.ones((num_joints, 1))], axis=1)
    return kps


def _frame_arrays(gt: Sequence[Mapping], pred: Sequence[Mapping], num_joints: int) -> dict:
    """Ids, joint masks, scores and (pred, gt, joint) normalised distances of one frame."""
    gt_kps = np.stack([_keypoints(p, num_joints) for p in gt]) if gt else np.zeros((0, num_joints, 3))
    pr_kps = np.stack([_keypoints(p, num_joints) for p in pred]) if pred else np.zeros((0, num_joints, 3))
    annotated = (gt_kps[..., 2] > 0) & np.isfinite(gt_kps[..., :2]).all(-1)
    present = np.isfinite(pr_kps[..., :2]).all(-1)
    heads = np.array([head_size(p["bbox_head"]) for p in gt], dtype=np.float64)
    d = np.linalg.norm(pr_kps[:, None, :, :2] - gt_kps[None, :, :, :2], axis=-1)      # (P, G, J)
    d = d / np.maximum(heads, 1e-12)[None, :, None]
    d = np.where(present[:, None, :] & annotated[None], d, np.inf)
    return {"gt_ids": [p["track_id"] for p in gt], "pr_ids": [p["track_id"] for p in pred],
            "annotated": annotated, "present": present, "scores": pr_kps[..., 2], "dist": d}


def assign_persons(dist: np.ndarray, annotated: np.ndarray, threshold: float = PCKH_THRESHOLD) -> dict[int, int]:
    """{prediction index: ground-truth index} maximising the summed PCKh of the pairs (pairs with none left out).

    dist (P, G, J) normalised distances (inf where a joint is missing), annotated (G, J)."""
    if dist.shape[0] == 0 or dist.shape[1] == 0:
        return {}
    pck = (dist <= threshold).sum(-1) / np.maximum(annotated.sum(-1), 1)[None]        # poseval's per-pair PCKh
    rows, cols = linear_sum_assignment(pck, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols) if pck[r, c] > 0}


# ------------------------------------------------------------------ AP
def precision_recall(scores, labels, num_gt: float) -> tuple[np.ndarray, np.ndarray]:
    """poseval's computeRPC: precision and recall after each prediction, by decreasing score (ties in input
    order; poseval's reversed argsort breaks them the other way)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.cumsum(np.asarray(labels, dtype=np.float64)[order])
    return tp / np.arange(1, len(order) + 1), tp / num_gt


def voc_ap(recall, precision) -> float:
    """poseval's VOCap: recall padded with 0 and 1, precision with 0 and 0, precision made non-increasing from
    the right, then the sum of precision x recall step where recall changes."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


# ------------------------------------------------------------------ the evaluation
def _videos(ground_truth, predictions) -> list[tuple[Mapping, Mapping]]:
    """One (ground truth, predictions) pair of frame mappings per video; a single mapping is one video."""
    if isinstance(ground_truth, Mapping):
        ground_truth, predictions = [ground_truth], [predictions]
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth videos but {len(predictions)} prediction videos")
    return list(zip(ground_truth, predictions))


def _check_frames(gt: Mapping, pred: Mapping) -> None:
    """A prediction for a frame the ground truth lacks is an error, not silently ignored."""
    for frame, persons in pred.items():
        if frame not in gt:
            known = list(gt)
            span = f"{known[0]!r} .. {known[-1]!r}" if known else "none"
            raise ValueError(f"prediction frame {frame!r} is not in the ground truth: "
                             f"its {len(known)} frames are {span}")
        ids = [p["track_id"] for p in persons]
        if len(set(ids)) != len(ids):
            raise ValueError(f"prediction frame {frame!r} repeats a track id: {sorted(ids)}")


def _default_joint_names(num_joints: int) -> list[str]:
    """The stick figures' joint names when the count matches, else joint_0, joint_1, ..."""
    from adaptation.pose.figures import JOINTS   # imported here: only this default needs the figures module

    return list(JOINTS) if len(JOINTS) == num_joints else [f"joint_{j}" for j in range(num_joints)]


def _per_joint(values: np.ndarray, names: list[str]) -> dict[str, float]:
    """{joint: value, ..., "total": the mean over the joints that have one}."""
    out = {name: float(v) for name, v in zip(names, values)}
    finite = values[np.isfinite(values)]
    out["total"] = float(finite.mean()) if len(finite) else float("nan")
    return out


def _ratio(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator > 0 else float("nan")


def pose_tracking_metrics(ground_truth, predictions, num_joints: int | None = None,
                          joint_names: Sequence[str] | None = None, score_threshold: float = 0.0,
                          threshold: float = PCKH_THRESHOLD) -> dict:
    """PoseTrack's metrics in percent: {"mota", "motp", "precision", "recall", "ap"}: {joint: value, "total"},
    and "id_switches": the identity switches summed over joints and videos.

    ground_truth: {frame: [{"track_id", "keypoints" (J, 3) x, y, v, "bbox_head" [x, y, w, h]}, ...]} for one
    video in frame order, or a list of such mappings (one per video); predictions: the same structure with
    keypoints (J, 3) x, y, score (NaN x or y: joint not predicted), a frame missing there has no predictions."""
    videos = _videos(ground_truth, predictions)
    for gt, pred in videos:
        _check_frames(gt, pred)
    if num_joints is None:
        people = [p for gt, _ in videos for persons in gt.values() for p in persons]
        if not people:
            raise ValueError("the ground truth has no persons: give num_joints")
        first = np.asarray(people[0]["keypoints"])
        num_joints = len(first) if first.ndim == 2 else first.size // 3
    names = list(joint_names) if joint_names is not None else _default_joint_names(num_joints)

    counts = {name: np.zeros(num_joints) for name in ("misses", "switches", "fp", "objects", "matches", "sum_d")}
    scores = [[] for _ in range(num_joints)]
    labels = [[] for _ in range(num_joints)]
    num_gt = np.zeros(num_joints)
    mh = mm.metrics.create()
    for gt, pred in videos:
        accs = [mm.MOTAccumulator(auto_id=True) for _ in range(num_joints)]
        for frame, gt_persons in gt.items():
            f = _frame_arrays(gt_persons, pred.get(frame, []), num_joints)
            num_gt += f["annotated"].sum(0)
            _add_ap_labels(f, threshold, scores, labels)
            for j in range(num_joints):
                g = np.flatnonzero(f["annotated"][:, j])
                p = np.flatnonzero(f["present"][:, j] & (f["scores"][:, j] >= score_threshold))
                d = f["dist"][p][:, g, j].T                                    # (gt, pred) as motmetrics wants
                accs[j].update([f["gt_ids"][i] for i in g], [f["pr_ids"][i] for i in p],
                               np.where(d <= threshold, d, np.nan))
        for j, acc in enumerate(accs):
            c = mh.compute(acc, metrics=MOT_COUNTS, return_dataframe=False)
            counts["misses"][j] += c["num_misses"]
            counts["switches"][j] += c["num_switches"]
            counts["fp"][j] += c["num_false_positives"]
            counts["objects"][j] += c["num_objects"]
            counts["matches"][j] += c["num_detections"]       # motmetrics' matches, switches included
            if c["num_detections"] > 0:
                counts["sum_d"][j] += c["motp"] * c["num_detections"]

    joints = _columns(counts, num_joints)
    # poseval's formulas (evaluateTracking.computeMetrics), on the counts summed over videos
    mota = np.array([100.0 - _ratio(c["misses"] + c["switches"] + c["fp"], c["objects"]) for c in joints])
    motp = np.array([100.0 * (1.0 - c["sum_d"] / c["matches"]) if c["matches"] > 0 else 0.0 for c in joints])
    precision = np.array([_ratio(c["matches"], c["matches"] + c["fp"]) for c in joints])
    recall = np.array([_ratio(c["matches"], c["objects"]) for c in joints])
    ap = np.array([_joint_ap(scores[j], labels[j], num_gt[j]) for j in range(num_joints)])
    return {"mota": _per_joint(mota, names), "motp": _per_joint(motp, names),
            "precision": _per_joint(precision, names), "recall": _per_joint(recall, names),
            "ap": _per_joint(ap, names), "id_switches": int(counts["switches"].sum())}


def _columns(counts: dict[str, np.ndarray], num_joints: int) -> list[dict[str, float]]:
    """The summed counts of each joint."""
    return [{k: float(v[j]) for k, v in counts.items()} for j in range(num_joints)]


def _add_ap_labels(f: dict, threshold: float, scores: list, labels: list) -> None:
    """Append one frame's per-joint (score, true positive) pairs, after the one-to-one person assignment."""
    to_gt = assign_persons(f["dist"], f["annotated"], threshold)
    for i in range(f["present"].shape[0]):
        for j in np.flatnonzero(f["present"][i]):
            scores[j].append(f["scores"][i, j])
            labels[j].append(i in to_gt and bool(f["dist"][i, to_gt[i], j] <= threshold))


def _joint_ap(scores: list, labels: list, num_gt: float) -> float:
    """AP in % of one joint type; NaN without ground truth, 0 without predictions (poseval's defaults)."""
    if num_gt == 0:
        return float("nan")
    if not scores:
        return 0.0
    precision, recall = precision_recall(scores, labels, num_gt)
    return 100.0 * voc_ap(recall, precision)
