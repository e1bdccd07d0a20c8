"""Optical flow without downloaded weights (OpenCV's DIS and Farneback), joint and box propagation, smoothing.

Simple Baselines (Xiao et al. 2018, "Simple Baselines for Human Pose Estimation and Tracking", section 3.1)
recovers persons the detector missed by carrying the previous frame's joints to the current frame with
optical flow and taking the box of the carried joints, enlarged, as a detection (`propagate_joints`,
`propagate_box`). They use FlowNet2; here the flow is classical and runs on the CPU: DIS (Kroeger et al.
2016) by default, Farneback (2003) as the alternative.

Flow convention: flow[y, x] = (dx, dy) carries the previous frame's pixel (x, y) to (x + dx, y + dy) in the
current frame (OpenCV's: previous(y, x) ~ current(y + dy, x + dx)). Points are (x, y) with pixel centres at
integer coordinates, as in adaptation/pose/keypoints.py.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import map_coordinates
from scipy.signal import savgol_filter

# DIS's medium preset: finest scale 1 (half resolution; the fast presets stop at a quarter) with 25 gradient
# descent iterations on 8x8 patches at stride 3 and 5 variational refinement iterations. Joints need sub-pixel
# motion on person-sized images, which the coarser presets blur away, and medium still runs in milliseconds on
# a CPU for small frames.
DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
# Farneback's parameters as OpenCV's samples and tutorial use them (pyramid halving, 3 levels, 15 px window,
# 3 iterations, degree-5 neighbourhood with sigma 1.2)
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
FLOW_METHODS = ("dis", "farneback")

# Simple Baselines enlarges the box of the propagated joints "by a certain percentage (15%)"; recalled from
# the paper, not checked against its code. Read here as 15% more width and height about the box's centre.
PROPAGATED_BOX_MARGIN = 0.15
# fewer carried joints than this cannot span a box: the old box is shifted by their median motion instead
MIN_JOINTS_FOR_BOX = 2

# temporal smoothing: a Savitzky-Golay filter of degree 2 over 7 observations, chosen values: degree 2 keeps
# straight and uniformly accelerated motion exactly, and 7 frames (0.28 s at 25 fps, under a walking step) cut
# independent jitter's standard deviation to 0.58 of itself at the centre of the window
SMOOTHING_WINDOW = 7
SMOOTHING_POLYORDER = 2


def _grey(frame: np.ndarray) -> np.ndarray:
    """uint8 grey image from (H, W) or (H, W, 3) RGB."""
    frame = np.asarray(frame)
    if frame.ndim == 3:
        frame = cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2GRAY)
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def dense_flow(previous: np.ndarray, current: np.ndarray, method: str = "dis") -> np.ndarray:
    """(H, W, 2) float32 flow (dx, dy) from `previous` to `current` (uint8, grey or RGB)."""
    previous, current = np.asarray(previous), np.asarray(current)
    if previous.shape != current.shape:
        raise ValueError(f"frames of shapes {previous.shape} and {current.shape}: flow needs two frames of one size")
    a, b = _grey(previous), _grey(current)
    if method == "dis":
        flow = cv2.DISOpticalFlow_create(DIS_PRESET).calc(a, b, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK)
    else:
        raise ValueError(f"flow method {method!r} is not one of {FLOW_METHODS}")
    return flow.astype(np.float32)


def _inside(points: np.ndarray, shape) -> np.ndarray:
    """Finite points within the frame's pixel centres, 0 .. W - 1 by 0 .. H - 1."""
    h, w = shape[:2]
    finite = np.isfinite(points).all(axis=1)
    x, y = np.where(finite, points[:, 0], -1.0), np.where(finite, points[:, 1], -1.0)
    return finite & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def propagate_joints(joints, flow: np.ndarray) -> np.ndarray:
    """(J, 2) joints (x, y) of the previous frame -> the current frame, each moved by the flow sampled bilinearly
    at it; joints that are NaN or outside the frame stay where they are."""
    joints = np.asarray(joints, dtype=np.float64).reshape(-1, 2)
    out = joints.copy()
    inside = _inside(joints, flow.shape)
    if inside.any():
        coords = np.stack([joints[inside, 1], joints[inside, 0]])      # map_coordinates reads (row, column)
        for c in range(2):
            out[inside, c] += map_coordinates(flow[..., c].astype(np.float64), coords, order=1, mode="nearest")
    return out


def box_from_joints(joints, margin: float = PROPAGATED_BOX_MARGIN) -> np.ndarray:
    """The tight box [x, y, w, h] of the finite joints, its width and height grown by `margin` about its centre."""
    joints = np.asarray(joints, dtype=np.float64).reshape(-1, 2)
    joints = joints[np.isfinite(joints).all(axis=1)]
    if not len(joints):
        raise ValueError("no finite joints to make a box of")
    (x0, y0), (x1, y1) = joints.min(axis=0), joints.max(axis=0)
    w, h = (x1 - x0) * (1.0 + margin), (y1 - y0) * (1.0 + margin)
    return np.array([(x0 + x1 - w) / 2.0, (y0 + y1 - h) / 2.0, w, h])


def propagate_box(box_xywh, joints_before, joints_after, margin: float = PROPAGATED_BOX_MARGIN) -> np.ndarray:
    """A person's box carried to the next frame with its joints (Simple Baselines' recovered detection).

    The box of the joints that moved (finite before and after), grown by `margin`, as Simple Baselines does;
    when fewer than MIN_JOINTS_FOR_BOX joints moved or they span no area (all on one line), the old box shifted
    by the joints' median displacement, robust to a joint the flow lost; unchanged when no joint moved."""
    box = np.asarray(box_xywh, dtype=np.float64).reshape(4)
    before = np.asarray(joints_before, dtype=np.float64).reshape(-1, 2)
    after = np.asarray(joints_after, dtype=np.float64).reshape(-1, 2)
    moved = np.isfinite(before).all(axis=1) & np.isfinite(after).all(axis=1)
    if moved.sum() >= MIN_JOINTS_FOR_BOX:
        spread = np.ptp(after[moved], axis=0)
        if (spread > 0).all():
            return box_from_joints(after[moved], margin)
    if not moved.any():
        return box.copy()
    shift = np.median(after[moved] - before[moved], axis=0)
    return np.array([box[0] + shift[0], box[1] + shift[1], box[2], box[3]])


def _smooth_series(values: np.ndarray, window: int, polyorder: int, method: str) -> np.ndarray:
    """Smooth one (T, 2) series of observations; too short a series gets the largest odd window that fits."""
    n = len(values)
    window = min(window, n if n % 2 else n - 1)
    if method == "savgol":
        if window <= polyorder:
            return values
        # mode "interp" fits the polynomial to the first and last windows, so the ends are not pulled inward
        return savgol_filter(values, window, polyorder, axis=0, mode="interp")
    if method == "mean":
        if window < 3:
            return values
        half = window // 2
        padded = np.pad(values, ((half, half), (0, 0)), mode="reflect", reflect_type="odd")  # keeps lines at ends
        kernel = np.ones(window) / window
        return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], axis=1)
    raise ValueError(f"smoothing method {method!r} is not one of ('savgol', 'mean')")


def smooth_tracks(joints, window: int = SMOOTHING_WINDOW, polyorder: int = SMOOTHING_POLYORDER,
                  method: str = "savgol") -> np.ndarray:
    """Temporal smoothing of one track's joints: (T, J, 2+) over its T frames -> the same shape.

    Each joint's (x, y) is filtered over the frames where it was seen (finite x and y), taken as consecutive:
    frames where it is NaN stay NaN and are skipped rather than filled. Further channels (v or score) are
    kept. method "savgol" (Savitzky-Golay of degree `polyorder`) or "mean" (a centred moving average)."""
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[2] < 2:
        raise ValueError(f"joints of shape {joints.shape}: smoothing needs (frames, joints, 2 or more)")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window {window} must be a positive odd number of frames")
    out = joints.copy()
    for j in range(joints.shape[1]):
        seen = np.isfinite(joints[:, j, :2]).all(axis=1)
        if seen.sum() >= 2:
            out[seen, j, :2] = _smooth_series(joints[seen, j, :2], window, polyorder, method)
    return out
