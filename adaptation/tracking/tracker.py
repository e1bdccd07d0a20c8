"""A SORT-style multi-object tracker (Bewley et al. 2016), with DeepSORT's appearance cost as an option.

SORT: each track is a constant-velocity Kalman filter on the box state [cx, cy, s, r, vcx, vcy, vs]
(centre, area, aspect ratio w/h and the velocities of the first three; the aspect ratio is taken as
constant), with SORT's F, H and its scaling of filterpy's identity P, Q, R (`KalmanBoxFilter`). Every
frame the tracks are predicted, the predictions are matched to the detections by the Hungarian
algorithm on 1 - IoU, pairs below an IoU of 0.3 are refused, matched tracks are corrected, unmatched
detections start new tracks and tracks unseen for more than `max_age` frames are dropped.

DeepSORT (Wojke et al. 2017) adds an appearance embedding per detection and the cosine distance
between a track's appearance and a detection's. Here it enters SORT's single assignment as a blend,
cost = (1 - w) (1 - IoU) + w (1 - cos), and it can open the IoU gate: a pair whose boxes overlap
less than `iou_threshold` may still match when its cosine distance is below `appearance_threshold`
(DeepSORT's max_cosine_distance, 0.2), which is what carries identities through crossings, occlusions
and turns that a constant-velocity box cannot follow. DeepSORT's matching cascade, Mahalanobis gate and
gallery of past embeddings are not reproduced: a track keeps one embedding, an exponential moving
average of its detections' (JDE / FairMOT's and StrongSORT's feature smoothing).

Defaults are for offline video evaluation (PoseTrack scores every output pose), not SORT's online
MOT setting: see `Tracker`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

# SORT's defaults (abewley/sort, sort.py: Sort(max_age=1, min_hits=3, iou_threshold=0.3))
SORT_MAX_AGE = 1
SORT_MIN_HITS = 3
SORT_IOU_THRESHOLD = 0.3
# DeepSORT's defaults (nwojke/deep_sort: Tracker(max_age=30, n_init=3), deep_sort_app --max_cosine_distance 0.2)
DEEPSORT_MAX_AGE = 30
DEEPSORT_MAX_COSINE_DISTANCE = 0.2
# weight of the previous embedding in a track's moving average: JDE's and FairMOT's feature smoothing
# (alpha 0.9), which StrongSORT adopts as its EMA; DeepSORT itself keeps a gallery of up to 100 features
EMBEDDING_MOMENTUM = 0.9

# Offline defaults. A track may coast through DeepSORT's 30 missed frames (about a second of video): in
# offline evaluation a missed detection or a short occlusion should not cost an identity, while SORT's
# max_age 1 is tuned for online MOT where coasting boxes are output errors. Every detection is output
# from its first frame (min_hits 1): PoseTrack counts a pose left without an id as a miss, and SORT's
# min_hits 3 suppresses the first frames of every track to filter false detections, which offline
# pipelines do with detection scores instead.
OFFLINE_MAX_AGE = DEEPSORT_MAX_AGE
OFFLINE_MIN_HITS = 1

# cost of a gated-out pair in the assignment: larger than any sum of allowed costs (each at most 1), so the
# Hungarian algorithm first maximises the number of allowed pairs, then minimises their cost
_FORBIDDEN = 1e6


# ------------------------------------------------------------------ boxes
def xywh_to_z(box_xywh) -> np.ndarray:
    """[x, y, w, h] -> SORT's measurement [cx, cy, s, r] (s the area, r = w / h)."""
    x, y, w, h = (float(v) for v in box_xywh)
    return np.array([x + w / 2.0, y + h / 2.0, w * h, w / h])


def z_to_xywh(state) -> np.ndarray:
    """SORT's [cx, cy, s, r, ...] -> [x, y, w, h] (w = sqrt(s r), h = s / w)."""
    cx, cy, s, r = (float(v) for v in state[:4])
    w = np.sqrt(max(s * r, 0.0))
    h = s / w if w > 0 else 0.0
    return np.array([cx - w / 2.0, cy - h / 2.0, w, h])


def iou_matrix(boxes_a, boxes_b) -> np.ndarray:
    """(A, 4) x (B, 4) xywh boxes -> (A, B) intersection over union (0 where both areas are 0)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    w = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def cosine_distance(a, b) -> np.ndarray:
    """(A, D) x (B, D) -> (A, B) 1 - cosine similarity (DeepSORT's appearance distance)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 1.0 - a @ b.T


# ------------------------------------------------------------------ Kalman filter
class KalmanBoxFilter:
    """SORT's constant-velocity Kalman filter on [cx, cy, s, r, vcx, vcy, vs], in plain numpy.

    Matrices as SORT sets them on filterpy's KalmanFilter(dim_x=7, dim_z=4), whose P, Q, R start as identities:
    R[2:, 2:] *= 10 (area and aspect are noisier measurements than the centre), P[4:, 4:] *= 1000 (the
    initial velocities are unobserved), P *= 10, Q[-1, -1] *= 0.01 and Q[4:, 4:] *= 0.01 (velocities,
    the area's most of all, change slowly). The velocities start at 0."""

    F = np.array([[1, 0, 0, 0, 1, 0, 0],
                  [0, 1, 0, 0, 0, 1, 0],
                  [0, 0, 1, 0, 0, 0, 1],
                  [0, 0, 0, 1, 0, 0, 0],
                  [0, 0, 0, 0, 1, 0, 0],
                  [0, 0, 0, 0, 0, 1, 0],
                  [0, 0, 0, 0, 0, 0, 1]], dtype=np.float64)
    H = np.eye(4, 7)

    def __init__(self, box_xywh):
        self.x = np.zeros(7)
        self.x[:4] = xywh_to_z(box_xywh)
        self.P = np.eye(7)
        self.P[4:, 4:] *= 1000.0
        self.P *= 10.0
        self.Q = np.eye(7)
        self.Q[-1, -1] *= 0.01
        self.Q[4:, 4:] *= 0.01
        self.R = np.eye(4)
        self.R[2:, 2:] *= 10.0

    def predict(self) -> np.ndarray:
        """x = F x, P = F P F^T + Q; returns the predicted box [x, y, w, h]."""
        if self.x[6] + self.x[2] <= 0:
            self.x[6] = 0.0   # SORT: never let the area velocity carry the area below zero
        self.x = self.F @ self.x
        self.P = self.F @ self.P @ self.F.T + self.Q
        return self.box()

    def update(self, box_xywh) -> None:
        """Correct with a measured box: y = z - H x, S = H P H^T + R, K = P H^T S^-1, x += K y, and P in
        Joseph's form (I - K H) P (I - K H)^T + K R K^T, as filterpy (equal to (I - K H) P for this K)."""
        z = xywh_to_z(box_xywh)
        y = z - self.H @ self.x
        S = self.H @ self.P @ self.H.T + self.R
        K = self.P @ self.H.T @ np.linalg.inv(S)
        self.x = self.x + K @ y
        I_KH = np.eye(7) - K @ self.H
        self.P = I_KH @ self.P @ I_KH.T + K @ self.R @ K.T

    def box(self) -> np.ndarray:
        """The current state's box [x, y, w, h]."""
        return z_to_xywh(self.x)


# ------------------------------------------------------------------ tracks and the tracker
@dataclass
class Track:
    """One tracked person: its filter, its appearance and SORT's bookkeeping."""

    track_id: int
    kf: KalmanBoxFilter
    embedding: np.ndarray | None = None
    score: float = float("nan")
    hits: int = 1              # the detection that starts a track counts (DeepSORT's hits = 1 at birth)
    hit_streak: int = 1
    time_since_update: int = 0


class Tracker:
    """SORT with an optional appearance term; `update` once per frame, empty frames included.

    max_age:              frames a track survives without a detection (SORT 1, DeepSORT 30; default 30,
                          see OFFLINE_MAX_AGE).
    min_hits:             SORT's output gate: a track's detections are reported once it has been matched in
                          `min_hits` consecutive frames, birth included (or during the first `min_hits`
                          frames of the video, as SORT). SORT uses 3; the default 1 reports every detection
                          from its first frame, as offline evaluation wants.
    iou_threshold:        SORT's gate: pairs overlapping less are not matched (unless the appearance opens it).
    appearance_weight:    w in cost = (1 - w) (1 - IoU) + w (1 - cos); 0 is plain SORT.
    appearance_threshold: a pair below the IoU gate may match when its cosine distance is below this
                          (DeepSORT's 0.2); only used when appearance_weight > 0.
    embedding_momentum:   weight of a track's previous embedding in its moving average.
    """

    def __init__(self, max_age: int = OFFLINE_MAX_AGE, min_hits: int = OFFLINE_MIN_HITS,
                 iou_threshold: float = SORT_IOU_THRESHOLD, appearance_weight: float = 0.0,
                 appearance_threshold: float = DEEPSORT_MAX_COSINE_DISTANCE,
                 embedding_momentum: float = EMBEDDING_MOMENTUM):
        if not 0.0 <= appearance_weight <= 1.0:
            raise ValueError(f"appearance_weight {appearance_weight} is outside [0, 1]")
        self.max_age = int(max_age)
        self.min_hits = int(min_hits)
        self.iou_threshold = float(iou_threshold)
        self.appearance_weight = float(appearance_weight)
        self.appearance_threshold = float(appearance_threshold)
        self.embedding_momentum = float(embedding_momentum)
        self.reset()

    def reset(self) -> None:
        """Forget every track; ids start again at 1 (a new video)."""
        self.tracks: list[Track] = []
        self.frame_count = 0
        self._next_id = 1

    def predicted_boxes(self) -> dict[int, np.ndarray]:
        """{track id: its box [x, y, w, h]}: corrected for the tracks matched in the last `update`, predicted for
        those coasting."""
        return {t.track_id: t.kf.box() for t in self.tracks}

    # ---------------------------------------------------------------- association
    def _cost(self, predicted: np.ndarray, boxes: np.ndarray, embeddings) -> tuple[np.ndarray, np.ndarray]:
        """(T, N) assignment cost and (T, N) mask of the pairs allowed to match."""
        iou = iou_matrix(predicted, boxes)
        cost = 1.0 - iou
        allowed = iou >= self.iou_threshold
        tracked = np.array([t.embedding is not None for t in self.tracks], dtype=bool)
        if self.appearance_weight > 0 and embeddings is not None and tracked.any():
            appearance = np.ones_like(cost)    # a track without an embedding looks unlike everything
            appearance[tracked] = cosine_distance(np.stack([t.embedding for t in self.tracks if t.embedding
                                                            is not None]), embeddings)
            cost = (1.0 - self.appearance_weight) * cost + self.appearance_weight * appearance
            allowed |= appearance < self.appearance_threshold
        return cost, allowed

    def _associate(self, boxes: np.ndarray, embeddings) -> tuple[list[tuple[int, int]], list[int]]:
        """Hungarian matching of the predicted tracks to the detections: matches (track, det), unmatched dets."""
        if not self.tracks or len(boxes) == 0:
            return [], list(range(len(boxes)))
        predicted = np.stack([t.kf.box() for t in self.tracks])
        cost, allowed = self._cost(predicted, boxes, embeddings)
        rows, cols = linear_sum_assignment(np.where(allowed, cost, _FORBIDDEN))
        matches = [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c]]
        matched = {c for _, c in matches}
        return matches, [d for d in range(len(boxes)) if d not in matched]

    def _blend_embedding(self, track: Track, embedding) -> None:
        """Exponential moving average of the unit embeddings, renormalised (JDE's smoothing)."""
        if embedding is None:
            return
        e = np.asarray(embedding, dtype=np.float64)
        e = e / max(np.linalg.norm(e), 1e-12)
        if track.embedding is None:
            track.embedding = e
        else:
            blended = self.embedding_momentum * track.embedding + (1.0 - self.embedding_momentum) * e
            track.embedding = blended / max(np.linalg.norm(blended), 1e-12)

    # ---------------------------------------------------------------- one frame
    def update(self, boxes_xywh, scores=None, embeddings=None) -> list[tuple[int, int]]:
        """One frame's detections -> [(track id, detection index)], sorted by detection index.

        boxes_xywh (N, 4) [x, y, w, h] with w, h > 0; scores (N,) are stored on the tracks for the caller
        (SORT's association does not use them); embeddings (N, D) or None. With min_hits 1 every detection
        gets an id; otherwise detections of tracks still under SORT's min_hits gate are left out."""
        boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        if len(boxes) and (boxes[:, 2:] <= 0).any():
            raise ValueError(f"boxes need positive widths and heights, got {boxes[(boxes[:, 2:] <= 0).any(1)][0]}")
        scores = np.full(len(boxes), np.nan) if scores is None else np.asarray(scores, dtype=np.float64)
        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(boxes), -1)
        self.frame_count += 1

        for track in self.tracks:
            track.kf.predict()
            if track.time_since_update > 0:
                track.hit_streak = 0     # SORT: a missed frame ends the streak
            track.time_since_update += 1
        self.tracks = [t for t in self.tracks if np.isfinite(t.kf.x).all()]

        matches, unmatched = self._associate(boxes, embeddings)
        owner: dict[int, Track] = {}
        for t, d in matches:
            track = self.tracks[t]
            track.kf.update(boxes[d])
            track.hits += 1
            track.hit_streak += 1
            track.time_since_update = 0
            track.score = float(scores[d])
            self._blend_embedding(track, None if embeddings is None else embeddings[d])
            owner[d] = track
        for d in unmatched:
            track = Track(self._next_id, KalmanBoxFilter(boxes[d]), score=float(scores[d]))
            self._next_id += 1
            self._blend_embedding(track, None if embeddings is None else embeddings[d])
            self.tracks.append(track)
            owner[d] = track
        self.tracks = [t for t in self.tracks if t.time_since_update <= self.max_age]

        early = self.frame_count <= self.min_hits
        return [(owner[d].track_id, d) for d in sorted(owner)
                if owner[d].hit_streak >= self.min_hits or early]
