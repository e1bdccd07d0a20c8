"""The built-in keypoint benchmark: articulated stick figures with COCO keypoints, from packaged data only.

Every image is an IMAGE_SIZE x IMAGE_SIZE (128 x 128) RGB canvas holding one or more figures. A
figure has the 14 JOINTS (head, neck, shoulders, elbows, wrists, hips, knees, ankles) of a small
kinematic model: a torso leaning up to 35 degrees, the head on a neck tilted up to 25 degrees,
arms and legs with random joint angles inside human-like limits (shoulder -20..160, elbow 0..140
either way, hip -15..50, knee 0..70 either way, each segment shortened by up to 40% as if it
turned out of the image plane), proportions jittered by 10% and a standing height of 50-110
pixels, placed anywhere: a quarter of the placements may leave part of the figure out of the frame
(about 17% of the figures lose a joint to it; at least six joints stay inside). Figures face the viewer: a figure's left side is on the image's right
when it stands upright, as COCO annotates persons facing the camera. It is drawn as strokes: the
torso a trapezoid from the shoulders to the hips (its corners a limb radius inside them, so the
limbs' round ends mark those joints), the neck, arms and legs thick round-capped lines of random
widths, the head a disc, each stroke anti-aliased from its exact distance field. The
two domains draw their poses, sizes and placements from the SAME distributions; only the
appearance changes, so that the shift is real but a model's knowledge of the body still transfers:

- `flat`     (the source): one or (a quarter of the images) two figures in flat colours, one per
             body part or one for the whole figure, on one plain background colour; every colour
             differs from the background's luma by more than 60, in either polarity.
- `textured` (the target): one to three figures whose parts are filled with colour gradients,
             tinted textures or photo crops (contrasting with the background under the figure),
             over crops of scikit-image's photos and tinted textures at random zoom, with 1-3
             distractor strokes (limb-like bent lines drawn under the figures, not annotated),
             then blur and sensor noise. A source model meets textures, clutter that looks like
             limbs, more figures and more occlusion, while the bodies keep their shapes.

Visibility (COCO's v): a joint outside the frame (pixel centres at integer coordinates; the frame
runs from the first centre to the last, 0 .. S - 1) is v = 0 with x = y = 0. Inside it, the joint
is visible, v = 2, when the strokes attached to it (for an elbow the upper arm and the forearm,
for the head its disc and the neck) make at least half of the final colour of its pixel (the one
whose centre is nearest), and occluded, v = 1, when strokes drawn later hide it: other limbs of
the same figure (an arm across the body, an arm behind the back) or a figure drawn later. Figures
are drawn in annotation order, each in a fixed depth order: arms behind the back, torso, legs,
neck, head, arms in front. Distractors lie under the figures and hide nothing. The flag depends
on the geometry only, identically in both domains. An annotation's `bbox` spans the pixels of
the frame that the figure's own strokes cover at least half (other figures do not cut it, so it
holds every labelled joint), [first column, first row, columns, rows]; its `area` is the number
of those pixels: the figure's pixel area, the analogue of COCO's mask area that scales OKS
(about 0.26 x the squared joint height, as for COCO persons).

Each image has its own random stream (domain seed, split, index), so train, val and test never
share an image, a smaller set is a prefix of the full one, and adding val (stream 2) left every train
and test image as it was. Checkpoints and defaults are chosen on val; figures are reported on test.
Building is deterministic and cached under $WORKBENCH_DATA/figures (default ~/.cache/workbench/figures)
as one folder per domain, `<domain>-v<VERSION>[-n<train>-<test>][-val<val>]/`, holding
`images/<split>/<id>.png` and `annotations_<split>.json` (COCO keypoints, image ids from 1). The
folder is written under a temporary name and renamed when complete, so a half-built folder is never
taken as built; a folder written before val existed gets its val split added on first use (train and
test untouched), never served without it. Smaller sets (for tests) come from `build_domain(...,
n_train=, n_test=, n_val=)` or WORKBENCH_FIGURES_N="<train>,<test>[,<val>]" (val defaults to the test
count). `builtin:figures/<domain>[:train|val|test]` names a domain wherever pose data is accepted
(`adaptation.pose.data`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .. import common

DOMAINS = ("flat", "textured")
SPLITS = ("train", "val", "test")
JOINTS = ("head", "neck", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
          "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
(HEAD, NECK, L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST,
 L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE) = range(len(JOINTS))
SKELETON = ((HEAD, NECK), (NECK, L_SHOULDER), (NECK, R_SHOULDER), (L_SHOULDER, L_ELBOW), (L_ELBOW, L_WRIST),
            (R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST), (L_SHOULDER, L_HIP), (R_SHOULDER, R_HIP), (L_HIP, R_HIP),
            (L_HIP, L_KNEE), (L_KNEE, L_ANKLE), (R_HIP, R_KNEE), (R_KNEE, R_ANKLE))
FLIP_PAIRS = ((2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13))
# OKS sigmas: COCO's value of the analogous joint; the head (a disc's centre) takes the mean of COCO's
# five face sigmas (nose .026, eyes .025, ears .035), the neck (mid-shoulders) the shoulders' .079.
COCO_FACE_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035)
SIGMAS = np.array([np.mean(COCO_FACE_SIGMAS), 0.079, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                   0.107, 0.107, 0.087, 0.087, 0.089, 0.089])
IMAGE_SIZE = 128
VERSION = 1
TRAIN_IMAGES, TEST_IMAGES = 1500, 300   # val: as many as test
SEEDS = {"flat": 31, "textured": 32}
SPLIT_STREAM = {"train": 0, "test": 1, "val": 2}   # val added after train / test: they kept theirs
COUNTS_VARIABLE = "WORKBENCH_FIGURES_N"
FIGURES_PER_IMAGE = {"flat": (0.75, 0.25), "textured": (0.35, 0.4, 0.25)}   # P(1 figure), P(2), P(3)

# The body, in fractions of the standing height (head top to ankles: 0.07 + 0.12 + 0.30 + 0.25 + 0.25).
BODY = {"head_radius": 0.07, "neck": 0.12, "torso": 0.30, "shoulder": 0.11, "hip": 0.075,
        "upper_arm": 0.17, "forearm": 0.16, "thigh": 0.25, "shin": 0.25}
STROKE_RADIUS = {"neck": (0.018, 0.03), "arm": (0.022, 0.04), "leg": (0.028, 0.05)}   # fractions of the height
MIN_RADIUS = 1.5             # pixels: a joint's nearest pixel centre is then fully inside its stroke
FIGURE_HEIGHT = (50.0, 110.0)
PROPORTION_JITTER = 0.1
LEAN_SD, LEAN_MAX = 12.0, 35.0    # degrees of the torso from vertical
HEAD_TILT = 25.0
SHOULDER, ELBOW = (-20.0, 160.0), (0.0, 140.0)   # degrees: upper arm from hanging (+ = away from the body), flexion
HIP, KNEE = (-15.0, 50.0), (0.0, 70.0)
FORESHORTEN = (0.6, 1.0)          # a limb segment's projected length, as if it turned out of the image plane
TORSO_FORESHORTEN = (0.85, 1.0)
ARM_BEHIND = 0.15                 # probability that an arm is drawn behind the torso
INSIDE = 0.75                     # probability that a placement keeps the whole figure in the frame
OVERFLOW = 0.4                    # otherwise the figure may stick out by this fraction of its size
MIN_JOINTS_IN_FRAME = 6
MAX_BOX_IOU = 0.3                 # figures may overlap, but not hide each other wholesale
PLACEMENT_TRIES = 30
VISIBLE_WEIGHT = 0.5              # the joint's own strokes' share of its pixel for v = 2
MIN_LUMA_CONTRAST = 60.0
PARTS = ("torso", "head", "left_arm", "right_arm", "left_leg", "right_leg")
SINGLE_COLOUR = 0.3               # probability that a figure has one colour (or fill) for all parts


def cache_dir() -> Path:
    return common.cache_dir("figures")


def check_domain(domain: str) -> str:
    return common.check_domain(domain, DOMAINS, "figures")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    return split


# ------------------------------------------------------------------ figures (shared by the domains)
@dataclasses.dataclass(frozen=True, eq=False)
class Figure:
    """One posed figure: joint positions (14, 2) as x, y in image pixels (pixel centres at integers),
    stroke radii in pixels, and which of its limbs are drawn first."""
    joints: np.ndarray
    radius: dict
    arms_behind: tuple[bool, bool]   # (left, right) arm drawn behind the torso
    left_first: bool                 # the left leg (and arm) drawn before the right one

    def shifted(self, dx: float, dy: float) -> Figure:
        return dataclasses.replace(self, joints=np.round(self.joints + (dx, dy), 2))

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) x, y corners of the box around all strokes."""
        pad = np.full((len(JOINTS), 1), max(self.radius["arm"], self.radius["leg"], self.radius["neck"]))
        pad[HEAD] = self.radius["head"]
        return (self.joints - pad).min(0), (self.joints + pad).max(0)


@dataclasses.dataclass(frozen=True, eq=False)
class Stroke:
    """One drawn shape: a round-capped line (`points` its two ends, a disc when they coincide) or a
    convex polygon (radius 0); `joints` are the joints it is attached to (it never hides them)."""
    part: str
    points: np.ndarray
    radius: float
    joints: tuple[int, ...]
    polygon: bool = False


@dataclasses.dataclass(frozen=True)
class LimbAngles:
    """One side's limbs: each segment's direction in degrees from the torso's `down` towards the figure's
    side (the forearm's and shin's include the elbow's and knee's flexion) and its projected length as a
    fraction of the segment's (FORESHORTEN)."""
    upper_arm: float
    upper_arm_length: float
    forearm: float
    forearm_length: float
    thigh: float
    thigh_length: float
    shin: float
    shin_length: float


def sample_pose(rng: np.random.Generator) -> Figure:
    """A random figure with its neck at the origin."""
    height = rng.uniform(*FIGURE_HEIGHT)
    size = body_sizes(rng, height)
    lean = np.radians(np.clip(rng.normal(0.0, LEAN_SD), -LEAN_MAX, LEAN_MAX))
    head_tilt = rng.uniform(-HEAD_TILT, HEAD_TILT)
    torso_length = rng.uniform(*TORSO_FORESHORTEN)

    def bend(limits) -> float:   # a flexion either way
        return float(rng.choice((-1.0, 1.0)) * rng.uniform(*limits))

    limbs = []
    for _ in ("left", "right"):
        upper_arm, upper_arm_length = rng.uniform(*SHOULDER), rng.uniform(*FORESHORTEN)
        forearm, forearm_length = upper_arm + bend(ELBOW), rng.uniform(*FORESHORTEN)
        thigh, thigh_length = rng.uniform(*HIP), rng.uniform(*FORESHORTEN)
        shin, shin_length = thigh + bend(KNEE), rng.uniform(*FORESHORTEN)
        limbs.append(LimbAngles(upper_arm, upper_arm_length, forearm, forearm_length, thigh, thigh_length, shin,
                                shin_length))
    joints = pose_joints(size, lean, head_tilt, torso_length, *limbs)
    return Figure(joints, stroke_radii(rng, height, size),
                  (bool(rng.random() < ARM_BEHIND), bool(rng.random() < ARM_BEHIND)), bool(rng.random() < 0.5))


def body_sizes(rng: np.random.Generator, height: float) -> dict:
    """Segment lengths (pixels) of a figure `height` tall: BODY's proportions, each jittered."""
    return {name: share * height * rng.uniform(1 - PROPORTION_JITTER, 1 + PROPORTION_JITTER)
            for name, share in BODY.items()}


def stroke_radii(rng: np.random.Generator, height: float, size: dict) -> dict:
    radius = {"head": size["head_radius"]}
    for part, (low, high) in STROKE_RADIUS.items():
        radius[part] = max(MIN_RADIUS, height * rng.uniform(low, high))
    return radius


def pose_joints(size: dict, lean: float, head_tilt: float, torso_length: float, left: LimbAngles,
                right: LimbAngles) -> np.ndarray:
    """(14, 2) joints, neck at the origin, of the kinematic chain: the torso `lean` radians from vertical,
    the head `head_tilt` degrees off the torso's axis, each limb segment turned and shortened as its side's
    LimbAngles say (positive angles turn away from the body)."""
    down, leftward = np.array([np.sin(lean), np.cos(lean)]), np.array([np.cos(lean), -np.sin(lean)])

    def direction(degrees: float) -> np.ndarray:
        """Unit vector turned from the torso's `down` towards the figure's left by `degrees`."""
        angle = np.radians(degrees)
        return np.cos(angle) * down + np.sin(angle) * leftward

    joints = np.zeros((len(JOINTS), 2))
    joints[HEAD] = -direction(head_tilt) * size["neck"]
    hip_centre = down * size["torso"] * torso_length
    for side, limb, (shoulder, elbow, wrist, hip, knee, ankle) in (
            (1.0, left, (L_SHOULDER, L_ELBOW, L_WRIST, L_HIP, L_KNEE, L_ANKLE)),
            (-1.0, right, (R_SHOULDER, R_ELBOW, R_WRIST, R_HIP, R_KNEE, R_ANKLE))):
        joints[shoulder] = side * size["shoulder"] * leftward
        joints[hip] = hip_centre + side * size["hip"] * leftward
        joints[elbow] = joints[shoulder] + direction(side * limb.upper_arm) * size["upper_arm"] * limb.upper_arm_length
        joints[wrist] = joints[elbow] + direction(side * limb.forearm) * size["forearm"] * limb.forearm_length
        joints[knee] = joints[hip] + direction(side * limb.thigh) * size["thigh"] * limb.thigh_length
        joints[ankle] = joints[knee] + direction(side * limb.shin) * size["shin"] * limb.shin_length
    return np.round(joints, 2)


def figure_strokes(figure: Figure) -> list[Stroke]:
    """The figure's strokes in drawing order (later strokes cover earlier ones)."""
    j, r = figure.joints, figure.radius

    def limb(part: str, a: int, b: int, radius: float) -> Stroke:
        return Stroke(part, j[[a, b]], radius, (a, b))

    legs = {"left": [limb("left_leg", L_HIP, L_KNEE, r["leg"]), limb("left_leg", L_KNEE, L_ANKLE, r["leg"])],
            "right": [limb("right_leg", R_HIP, R_KNEE, r["leg"]), limb("right_leg", R_KNEE, R_ANKLE, r["leg"])]}
    arms = {"left": [limb("left_arm", L_SHOULDER, L_ELBOW, r["arm"]), limb("left_arm", L_ELBOW, L_WRIST, r["arm"])],
            "right": [limb("right_arm", R_SHOULDER, R_ELBOW, r["arm"]), limb("right_arm", R_ELBOW, R_WRIST, r["arm"])]}
    sides = ("left", "right") if figure.left_first else ("right", "left")
    behind = dict(zip(("left", "right"), figure.arms_behind))
    strokes = [s for side in sides if behind[side] for s in arms[side]]
    strokes += [torso_stroke(figure)]
    strokes += [s for side in sides for s in legs[side]]
    strokes += [limb("torso", NECK, HEAD, r["neck"]), Stroke("head", j[[HEAD, HEAD]], r["head"], (HEAD,))]
    strokes += [s for side in sides if not behind[side] for s in arms[side]]
    return strokes


def torso_stroke(figure: Figure) -> Stroke:
    """The torso: a trapezoid through the neck whose corners sit one limb radius inside the shoulders and
    hips, so that the round end of each arm and leg, not a corner of the torso, is drawn at those joints."""
    j, r = figure.joints, figure.radius

    def inset(joint: int, other: int, radius: float) -> np.ndarray:
        towards = j[other] - j[joint]
        return j[joint] + towards * min(radius / max(float(np.hypot(*towards)), 1e-9), 0.5)

    corners = np.stack([inset(L_SHOULDER, R_SHOULDER, r["arm"]), inset(R_SHOULDER, L_SHOULDER, r["arm"]),
                        inset(R_HIP, L_HIP, r["leg"]), inset(L_HIP, R_HIP, r["leg"])])
    return Stroke("torso", corners, 0.0, (NECK, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP), polygon=True)


def joints_in_frame(joints: np.ndarray) -> np.ndarray:
    """Which joints lie in the frame: between the first and the last pixel centre (at 0 and S - 1), both ways."""
    return ((joints >= 0) & (joints <= IMAGE_SIZE - 1)).all(-1)


def _box_iou(a, b) -> float:
    (a0, a1), (b0, b1) = a, b
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None))
    return float(inter / (np.prod(a1 - a0) + np.prod(b1 - b0) - inter))


def _offset_range(low: float, high: float, inside: bool) -> tuple[float, float]:
    """Shifts of a figure spanning [low, high] that keep it in the frame, or let it stick out."""
    lo, hi = -low, IMAGE_SIZE - 1 - high
    if inside and lo <= hi:
        return lo, hi
    margin = OVERFLOW * (high - low)
    return lo - margin, hi + margin


def place_figures(rng: np.random.Generator, count: int) -> list[Figure]:
    """`count` figures at random places with at least MIN_JOINTS_IN_FRAME joints in the frame and a box
    overlap (IoU) of at most MAX_BOX_IOU with the figures before them; a figure that finds no such place
    in PLACEMENT_TRIES draws is left out, except the first, which draws a new pose instead."""
    placed, boxes = [], []
    for slot in range(count):
        figure = None
        while figure is None:
            figure = _try_place(rng, sample_pose(rng), boxes)
            if slot > 0:
                break
        if figure is not None:
            placed.append(figure)
            boxes.append(figure.extent())
    return placed


def _try_place(rng: np.random.Generator, local: Figure, boxes: list) -> Figure | None:
    low, high = local.extent()
    for _ in range(PLACEMENT_TRIES):
        inside = rng.random() < INSIDE
        dx, dy = (rng.uniform(*_offset_range(low[k], high[k], inside)) for k in (0, 1))
        figure = local.shifted(dx, dy)
        if (joints_in_frame(figure.joints).sum() >= MIN_JOINTS_IN_FRAME
                and all(_box_iou(figure.extent(), other) <= MAX_BOX_IOU for other in boxes)):
            return figure
    return None


# ------------------------------------------------------------------ coverage, visibility, boxes
@dataclasses.dataclass
class Layer:
    """One stroke rasterised: its figure's index, the stroke, the window (rows, cols) of the canvas it
    touches and its coverage (alpha) there."""
    figure: int
    stroke: Stroke
    window: tuple[slice, slice]
    alpha: np.ndarray


def _grid(window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Row (n, 1) and column (1, m) pixel-centre coordinates of a window."""
    return (np.arange(window[0].start, window[0].stop, dtype=np.float64)[:, None],
            np.arange(window[1].start, window[1].stop, dtype=np.float64)[None, :])


def _window(points: np.ndarray, radius: float) -> tuple[slice, slice] | None:
    """The rows and columns of the canvas within reach of a stroke (its ramp included), None off the canvas."""
    (x0, y0), (x1, y1) = points.min(0).tolist(), points.max(0).tolist()
    top, left = max(int(np.floor(y0 - radius - 1)), 0), max(int(np.floor(x0 - radius - 1)), 0)
    bottom, right = min(int(np.ceil(y1 + radius + 2)), IMAGE_SIZE), min(int(np.ceil(x1 + radius + 2)), IMAGE_SIZE)
    if bottom <= top or right <= left:
        return None
    return slice(top, bottom), slice(left, right)


def _unit(x: np.ndarray) -> np.ndarray:
    """x clipped to [0, 1] (np.clip's overhead dominates on the small windows)."""
    return np.minimum(np.maximum(x, 0.0), 1.0)


def capsule_coverage(a: np.ndarray, b: np.ndarray, radius: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coverage of the pixels centred at (xs, ys) (broadcast) by a round-capped line from a to b: 1 inside,
    0 outside, the one-pixel ramp of the exact distance between (anti-aliasing)."""
    (ax, ay), (bx, by) = a.tolist(), b.tolist()
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else _unit(((xs - ax) * dx + (ys - ay) * dy) / length2)
    return _unit(radius + 0.5 - np.hypot(xs - (ax + t * dx), ys - (ay + t * dy)))


def polygon_coverage(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coverage of the pixels centred at (xs, ys) by a convex polygon, from the largest signed distance to
    its edges."""
    centre = points.mean(0)
    signed = None
    for p, q in zip(points, np.roll(points, -1, axis=0)):
        normal = np.array([q[1] - p[1], p[0] - q[0]])
        normal /= max(np.hypot(*normal), 1e-9)
        if (centre - p) @ normal > 0:   # point it outwards
            normal = -normal
        distance = (xs - p[0]) * normal[0] + (ys - p[1]) * normal[1]
        signed = distance if signed is None else np.maximum(signed, distance)
    return _unit(0.5 - signed)


def stroke_coverage(stroke: Stroke, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if stroke.polygon:
        return polygon_coverage(stroke.points, xs, ys)
    return capsule_coverage(stroke.points[0], stroke.points[1], stroke.radius, xs, ys)


def stroke_layers(figures: list[Figure]) -> list[Layer]:
    """Every stroke of every figure in drawing order (figure by figure), rasterised where it is on the canvas."""
    layers = []
    for index, figure in enumerate(figures):
        for stroke in figure_strokes(figure):
            window = _window(stroke.points, stroke.radius)
            if window is not None:
                ys, xs = _grid(window)
                layers.append(Layer(index, stroke, window, stroke_coverage(stroke, xs, ys)))
    return layers


def joint_visibility(figures: list[Figure], layers: list[Layer]) -> np.ndarray:
    """COCO flags (F, 14): 0 outside the frame; else 2 when the strokes attached to the joint make at
    least VISIBLE_WEIGHT of its pixel's final colour (blending the layers in order), 1 when later strokes
    hide it. The coverage at the joint pixels comes from the same formulas as the drawing."""
    if not figures:
        return np.zeros((0, len(JOINTS)), np.int64)
    joints = np.stack([f.joints for f in figures])
    xs, ys = np.floor(joints + 0.5).transpose(2, 0, 1)
    own = np.zeros(xs.shape)   # the attached strokes' share of each joint pixel's colour so far
    for layer in layers:
        alpha = stroke_coverage(layer.stroke, xs, ys)
        own *= 1.0 - alpha
        attached = (layer.figure, list(layer.stroke.joints))
        own[attached] += alpha[attached]
    return np.where(joints_in_frame(joints), np.where(own >= VISIBLE_WEIGHT, 2, 1), 0)


def figure_silhouettes(count: int, layers: list[Layer]) -> np.ndarray:
    """(F, S, S) bool: the pixels each figure's own strokes cover at least half (other figures ignored)."""
    cover = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE))
    for layer in layers:
        region = cover[(layer.figure,) + layer.window]
        np.maximum(region, layer.alpha, out=region)
    return cover >= 0.5


def figure_annotation(figure: Figure, visibility: np.ndarray, silhouette: np.ndarray) -> dict:
    """COCO fields of one figure (no ids): bbox and area from its silhouette, keypoints with flags."""
    rows, cols = np.flatnonzero(silhouette.any(1)), np.flatnonzero(silhouette.any(0))
    keypoints = []
    for (x, y), v in zip(figure.joints.tolist(), visibility.tolist()):
        keypoints += [round(x, 2), round(y, 2), v] if v else [0, 0, 0]
    return {"bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)],
            "area": int(silhouette.sum()), "iscrowd": 0, "num_keypoints": int((visibility > 0).sum()),
            "keypoints": keypoints}


def composite(image: np.ndarray, layers: list[Layer], fills: list[dict]) -> np.ndarray:
    """Blend every layer over the float image (in place) with its coverage as alpha; fills[figure][part] is
    a colour (3,) or a canvas-sized (S, S, 3) fill."""
    for layer in layers:
        fill = fills[layer.figure][layer.stroke.part]
        region = image[layer.window]
        region += layer.alpha[..., None] * ((fill[layer.window] if fill.ndim == 3 else fill) - region)
    return image


# ------------------------------------------------------------------ appearances
def contrasting_colour(rng: np.random.Generator, against: float) -> np.ndarray:
    """A random colour whose luma differs from `against` by more than MIN_LUMA_CONTRAST (either side)."""
    for _ in range(50):
        colour = rng.uniform(0, 256, 3)
        if abs(common.luma(colour) - against) > MIN_LUMA_CONTRAST:
            return colour
    return np.full(3, 0.0 if against > 127 else 255.0)


def _part_fills(rng: np.random.Generator, make, layers: list[Layer], figure: int) -> dict:
    """The fills of one figure's parts, `make(window)` drawing one that covers `window`: one fill for the
    whole figure (SINGLE_COLOUR of the figures) or one per part (for the parts on the canvas)."""
    windows = {}
    for layer in layers:
        if layer.figure == figure:
            windows.setdefault(layer.stroke.part, []).append(layer.window)
    if rng.random() < SINGLE_COLOUR:
        fill = make(_union_window(w for part in windows.values() for w in part))
        return {part: fill for part in windows}
    return {part: make(_union_window(windows[part])) for part in PARTS if part in windows}


def _union_window(windows) -> tuple[slice, slice]:
    windows = list(windows)
    return (slice(min(w[0].start for w in windows), max(w[0].stop for w in windows)),
            slice(min(w[1].start for w in windows), max(w[1].stop for w in windows)))


def paint_flat(rng: np.random.Generator, figures: list[Figure], layers: list[Layer]) -> np.ndarray:
    """Flat part colours on one plain background colour, all contrasting with it."""
    background = rng.integers(0, 256, 3).astype(np.float64)
    fills = [_part_fills(rng, lambda window: np.round(contrasting_colour(rng, common.luma(background))), layers, index)
             for index in range(len(figures))]
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    return np.round(np.clip(composite(image, layers, fills), 0, 255)).astype(np.uint8)


def _backgrounds() -> tuple[tuple[Image.Image, ...], tuple[Image.Image, ...]]:
    return (common.skimage_images(common.BACKGROUND_PHOTOS, "RGB"),
            common.skimage_images(common.BACKGROUND_TEXTURES, "L"))


def _crop(rng: np.random.Generator, source: Image.Image, sides: tuple[int, int],
          shape: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """A random crop resized to `shape` (rows, cols), float: a square of side drawn from `sides` would fill
    the canvas, so the zoom varies but does not depend on `shape`."""
    zoom = rng.integers(sides[0], min(sides[1], *source.size) + 1) / IMAGE_SIZE
    width, height = min(shape[1] * zoom, source.size[0]), min(shape[0] * zoom, source.size[1])
    left, top = rng.uniform(0, source.size[0] - width), rng.uniform(0, source.size[1] - height)
    crop = source.resize((shape[1], shape[0]), Image.BILINEAR, box=(left, top, left + width, top + height))
    return np.asarray(crop, np.float64)


def textured_background(rng: np.random.Generator) -> np.ndarray:
    """A crop of a photo (channels maybe shuffled) or of a grey texture tinted between two random colours,
    maybe mirrored."""
    photos, textures = _backgrounds()
    if rng.random() < 0.3:
        grey = _crop(rng, textures[int(rng.integers(len(textures)))], (96, 320)) / 255.0
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = low + (high - low) * grey[..., None]
    else:
        image = _crop(rng, photos[int(rng.integers(len(photos)))], (96, 320))
        if rng.random() < 0.5:
            image = image[..., rng.permutation(3)]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def textured_fill(rng: np.random.Generator, base: np.ndarray, window: tuple[slice, slice]) -> np.ndarray:
    """A canvas-sized fill around a base colour, computed inside `window` only (zero elsewhere): a linear
    gradient, a tinted texture or a re-tinted photo."""
    photos, textures = _backgrounds()
    shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    kind = int(rng.integers(3))
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = _grid(window)
        ramp = np.cos(angle) * (xs - xs.mean()) + np.sin(angle) * (ys - ys.mean())
        ramp /= max(2 * float(np.abs(ramp).max()), 1.0)   # -0.5 .. 0.5 across the window, centred on the base
        fill = base + ramp[..., None] * rng.uniform(-160, 160, 3)
    elif kind == 1:
        grey = _crop(rng, textures[int(rng.integers(len(textures)))], (48, 256), shape) / 255.0
        fill = base + (grey[..., None] - grey.mean()) * rng.uniform(80, 200)
    else:
        photo = _crop(rng, photos[int(rng.integers(len(photos)))], (48, 256), shape)
        fill = base + (photo - photo.mean((0, 1))) * rng.uniform(0.4, 0.8)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas[window] = np.clip(fill, 0, 255)
    return canvas


def _distractors(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """1-3 limb-like strokes that are not figures: bent lines of one or two segments, limb-wide, flat or
    textured, drawn under the figures."""
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(MIN_RADIUS, 0.05 * FIGURE_HEIGHT[1])
        points = [rng.uniform(0, IMAGE_SIZE, 2)]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(1, 3))):
            length = rng.uniform(0.15, 0.3) * rng.uniform(*FIGURE_HEIGHT)
            points.append(points[-1] + length * np.array([np.cos(heading), np.sin(heading)]))
            heading += rng.uniform(-np.pi / 2, np.pi / 2)
        segments = [(a, b, _window(np.stack([a, b]), radius)) for a, b in zip(points, points[1:])]
        segments = [(a, b, window) for a, b, window in segments if window is not None]
        colour = contrasting_colour(rng, common.luma(image.mean((0, 1))))
        if not segments or rng.random() < 0.5:
            fill = colour
        else:
            fill = textured_fill(rng, colour, _union_window(w for _, _, w in segments))
        for a, b, window in segments:
            ys, xs = _grid(window)
            alpha = capsule_coverage(a, b, radius, xs, ys)[..., None]
            region = image[window]
            region += alpha * ((fill[window] if fill.ndim == 3 else fill) - region)
    return image


def paint_textured(rng: np.random.Generator, figures: list[Figure], layers: list[Layer]) -> np.ndarray:
    """Photo or texture background, distractor strokes, figures with textured parts contrasting with the
    mean of the background under them, then blur (half of the images, radius 0.3-1) and Gaussian noise
    (sigma up to 8)."""
    image = _distractors(rng, textured_background(rng))
    fills = []
    for index in range(len(figures)):
        window = _union_window(layer.window for layer in layers if layer.figure == index)
        under = common.luma(image[window].reshape(-1, 3).mean(0))
        fills.append(_part_fills(rng, lambda where: textured_fill(rng, contrasting_colour(rng, under), where),
                                 layers, index))
    image = np.round(np.clip(composite(image, layers, fills), 0, 255)).astype(np.uint8)
    if rng.random() < 0.5:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0)))))
    noise = rng.uniform(0, 8) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.round(np.clip(image + noise, 0, 255)).astype(np.uint8)


PAINTERS = {"flat": paint_flat, "textured": paint_textured}


def render_image(domain: str, split: str, index: int) -> tuple[np.ndarray, list[dict], list[Figure]]:
    """Image `index` of a domain's split: (image (S, S, 3) uint8, COCO annotation fields per figure, the
    figures). Each image has its own random stream (domain seed, split, index), so an image never
    depends on how many were built before it."""
    rng = np.random.default_rng([SEEDS[check_domain(domain)], SPLIT_STREAM[check_split(split)], index])
    shares = FIGURES_PER_IMAGE[domain]
    figures = place_figures(rng, 1 + int(rng.choice(len(shares), p=shares)))
    layers = stroke_layers(figures)
    image = PAINTERS[domain](rng, figures, layers)
    visibility = joint_visibility(figures, layers)
    silhouettes = figure_silhouettes(len(figures), layers)
    return image, [figure_annotation(*args) for args in zip(figures, visibility, silhouettes)], figures


# ------------------------------------------------------------------ cache
def figure_counts(n_train: int | None = None, n_test: int | None = None,
                  n_val: int | None = None) -> tuple[int, int, int]:
    """(train, val, test) images: arguments, else WORKBENCH_FIGURES_N="<train>,<test>[,<val>]", else
    1500 / 300 / 300; val defaults to the test count."""
    return common.split_counts(COUNTS_VARIABLE, (TRAIN_IMAGES, TEST_IMAGES), "figure image", n_train, n_test, n_val)


def domain_dir(domain: str, n_train: int | None = None, n_test: int | None = None, n_val: int | None = None) -> Path:
    suffix = common.counts_suffix(figure_counts(n_train, n_test, n_val), (TRAIN_IMAGES, TEST_IMAGES))
    return cache_dir() / f"{check_domain(domain)}-v{VERSION}{suffix}"


def _has_split(folder: Path, split: str) -> bool:
    return (folder / f"annotations_{split}.json").is_file()   # written last: the split is complete


def _is_built(folder: Path) -> bool:
    return all(_has_split(folder, split) for split in SPLITS)


def _category() -> dict:
    return {"id": 1, "name": "figure", "supercategory": "figure", "keypoints": list(JOINTS),
            "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}


def _write_split(folder: Path, domain: str, split: str, count: int) -> None:
    images_dir = folder / "images" / split
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image, fields, _ = render_image(domain, split, index)
        image_id = index + 1
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(images_dir / name, compress_level=1)   # fast; the files stay small
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for field in fields:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, **field})
    data = {"info": {"description": f"built-in figures, domain {domain}, {split} split", "version": VERSION},
            "images": images, "annotations": annotations, "categories": [_category()]}
    (folder / f"annotations_{split}.json").write_text(json.dumps(data))


def build_domain(domain: str, force: bool = False, n_train: int | None = None, n_test: int | None = None,
                 n_val: int | None = None) -> Path:
    """Build (or reuse) the cached images and annotations of one domain; returns its folder. The folder is
    built under a temporary name and renamed into place when complete; a folder that holds some splits
    (one built before val existed) gets the missing ones added."""
    folder = domain_dir(domain, n_train, n_test, n_val)
    counts = dict(zip(SPLITS, figure_counts(n_train, n_test, n_val)))
    if not force and _is_built(folder):
        return folder
    if not force and any(_has_split(folder, split) for split in SPLITS):
        _add_missing_splits(folder, domain, counts)
        return folder

    def write(tmp: Path) -> None:
        for split in SPLITS:
            _write_split(tmp, domain, split, counts[split])

    return common.build_folder(folder, write, _is_built, force)


def _add_missing_splits(folder: Path, domain: str, counts: dict) -> None:
    """Render the splits a cached folder lacks into a temporary folder and move them in, images first and the
    annotation file (what marks a split as built) last; the splits it has stay byte for byte."""
    for split in SPLITS:
        if _has_split(folder, split):
            continue
        tmp = folder / f".{split}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_split(tmp, domain, split, counts[split])
            images = folder / "images" / split
            images.parent.mkdir(exist_ok=True)
            shutil.rmtree(images, ignore_errors=True)   # left by an interrupted attempt (rendering is deterministic)
            os.replace(tmp / "images" / split, images)
            os.replace(tmp / f"annotations_{split}.json", folder / f"annotations_{split}.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def annotation_file(domain: str, split: str, n_train: int | None = None, n_test: int | None = None,
                    n_val: int | None = None) -> Path:
    """The COCO keypoint JSON of a domain's split, building the domain if needed."""
    check_split(split)
    return build_domain(domain, n_train=n_train, n_test=n_test, n_val=n_val) / f"annotations_{split}.json"


def image_root(domain: str, split: str, n_train: int | None = None, n_test: int | None = None,
               n_val: int | None = None) -> Path:
    """The folder that the split's `file_name`s are relative to, building the domain if needed."""
    check_split(split)
    return build_domain(domain, n_train=n_train, n_test=n_test, n_val=n_val) / "images" / split
