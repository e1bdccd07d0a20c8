"""Crowd pose tracking: detect, track, estimate, carry forward with optical flow, smooth.

The pipeline of the Human-in-Events crowd pose tracking entries and of Simple Baselines (Xiao et al. 2018,
"Simple Baselines for Human Pose Estimation and Tracking"), frame by frame over a video:

1. detect:    the person detector's boxes scoring at least `detection_threshold`;
2. propagate: (with `flow` dis or farneback) the people of the previous frame carried into this one: their boxes moved by the
              dense optical flow between the two frames at their joints (`carry_box`) added to the detections, so that a person the detector misses for a
              frame or a few keeps its track (at most FLOW_MAX_GAP frames in a row on flow alone); boxes of
              the same person are merged by non-maximum suppression at NMS_IOU, detections first;
3. estimate:  the top-down pose model's joints in every box (the crop, heatmaps and flip test of the pose
              family), scored by their heatmap maxima;
4. track:     the SORT-style tracker links the boxes to tracks (IoU with the Kalman-predicted boxes, and a
              colour-histogram appearance term when `appearance_weight` > 0);
5. smooth:    (offline, after the last frame) each track's joints smoothed over time (`flow.smooth_tracks`).

Each video's tracks are written as PoseTrack JSON (`tracks/<video>.json`: keypoints [x, y, score], the
mean joint score as the person's `scores`) and, with `video=True`, as a GIF whose skeletons are coloured by
track; with annotated data the run also scores the tracks (`metrics.pose_tracking_metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime

from . import flow as optical_flow
from .data import Video, load_videos
from .metrics import pose_tracking_metrics
from .tracker import OFFLINE_MAX_AGE, SORT_IOU_THRESHOLD, Tracker

# Chosen on builtin:crowds/flat:val by MOTA (scripts/run_crowds_benchmark.py, docs/RESULTS.md), never on a test
# split: detection threshold from 0.3 / 0.5 / 0.7, joint threshold from 0 to 0.5 in steps of 0.1, appearance
# weight 0 or 0.5 at that pair, then flow (DIS) or none: none by 0.4 MOTA.
DETECTION_THRESHOLD = 0.7        # torchvision's detectors report boxes from 0.05; a person needs a confident one
JOINT_THRESHOLD = 0.4            # joints scoring lower are left out (PoseTrack's MOTA counts each as a false positive)
APPEARANCE_WEIGHT = 0.5
NMS_IOU = 0.5                    # detections and propagated boxes of one person merged above this overlap
FLOW_MAX_GAP = 3                 # frames a track may be carried by flow alone before it must be detected again
PROPAGATED_SCORE = 0.9           # a propagated box's score, relative to the box it was carried from
FLOW_JOINT_SCORE = 0.2           # joints scoring below it (unsure or outside the frame) do not carry a box
HISTOGRAM_BINS = 8               # per colour channel, for the appearance embedding
DEFAULT_DATA = "builtin:crowds/flat:test"


@dataclass
class TrackConfig(RunSettings):
    detector: str = ""
    pose: str = ""
    data: str = DEFAULT_DATA
    detection_threshold: float = DETECTION_THRESHOLD
    flow: str = "none"                      # dis | farneback | none (chosen on val, as the thresholds)
    smooth: bool = True
    appearance_weight: float = APPEARANCE_WEIGHT
    max_age: int = OFFLINE_MAX_AGE
    iou_threshold: float = SORT_IOU_THRESHOLD
    joint_threshold: float = JOINT_THRESHOLD
    flip_test: bool = True
    video: bool = True


# ------------------------------------------------------------------ the models
class PoseEstimator:
    """The pose family's top-down model on given boxes of a frame."""

    def __init__(self, path, runtime: Runtime, flip_test: bool = True):
        from ..dense.model import load_dense_model

        self.model, state = load_dense_model(path, runtime, task="pose")
        config = state["model_config"]
        self.input_size = tuple(config["image_size"])
        self.flip_pairs = [tuple(p) for p in config.get("flip_pairs", [])]
        self.joint_names = tuple(config.get("joint_names") or state.get("joint_names") or ())
        self.runtime, self.flip_test = runtime, flip_test

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes_xywh: np.ndarray) -> np.ndarray:
        """(n, J, 3) joints x, y in image pixels and their heatmap maxima."""
        from ..common import IMAGENET_MEAN, IMAGENET_STD
        from ..pose.data import HEATMAP_STRIDE, input_to_heatmap, warp
        from ..pose.evaluate import predict_heatmaps
        from ..pose.keypoints import affine_matrix, box_to_center_scale, decode_heatmaps, transform_points

        if len(boxes_xywh) == 0:
            return np.zeros((0, len(self.joint_names) or 1, 3))
        frame = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
        heatmap_size = (self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE)
        crops, matrices = [], []
        for box in boxes_xywh:
            center, size = box_to_center_scale(box, self.input_size[0] / self.input_size[1])
            matrix = affine_matrix(center, size, 0.0, self.input_size)
            crops.append(warp(frame, matrix, self.input_size))
            matrices.append(input_to_heatmap(matrix, self.input_size, heatmap_size))
        batch = torch.stack(crops)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        heatmaps = predict_heatmaps(self.model, (batch - mean) / std, self.runtime, self.flip_pairs, self.flip_test)
        coords, maxvals = decode_heatmaps(heatmaps.cpu())
        joints = []
        for c, m, matrix in zip(coords, maxvals, matrices):
            inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
            joints.append(np.concatenate([transform_points(c.double().numpy(), inverse), m.numpy()[:, None]], 1))
        return np.stack(joints)


def appearance_embedding(image: np.ndarray, box_xywh) -> np.ndarray:
    """A person's colours: the L2-normalised square root of the HISTOGRAM_BINS^3 colour histogram of the pixels
    in its box (the square root turns the cosine into the Bhattacharyya coefficient of the histograms)."""
    x, y, w, h = box_xywh
    rows = slice(max(int(y), 0), max(int(np.ceil(y + h)), int(y) + 1))
    cols = slice(max(int(x), 0), max(int(np.ceil(x + w)), int(x) + 1))
    pixels = image[rows, cols].reshape(-1, 3) // (256 // HISTOGRAM_BINS)
    codes = (pixels[:, 0].astype(np.int64) * HISTOGRAM_BINS + pixels[:, 1]) * HISTOGRAM_BINS + pixels[:, 2]
    histogram = np.sqrt(np.bincount(codes, minlength=HISTOGRAM_BINS ** 3).astype(np.float64))
    return histogram / max(float(np.linalg.norm(histogram)), 1e-12)


# ------------------------------------------------------------------ one video
@dataclass
class Tracked:
    """One person in one frame of the output."""
    track_id: int
    box: np.ndarray         # x, y, w, h
    score: float
    joints: np.ndarray      # (J, 3) x, y, score
    propagated: int = 0     # frames in a row this track has been carried by flow alone


def detections_with_propagated(detections: dict, previous: list[Tracked], flow: np.ndarray | None,
                               image_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes x, y, w, h, scores, frames on flow alone) of this frame: the detector's boxes, and with flow the
    previous frame's people carried into it, merged by NMS (a detection wins over a propagated box of the
    same person: ties of score go to the detection, which comes first)."""
    from torchvision.ops import nms

    xyxy = detections["boxes"]
    boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1) if len(xyxy) else np.zeros((0, 4))
    scores, streak = detections["scores"], np.zeros(len(boxes), dtype=np.int64)
    if flow is not None and previous:
        carried = [(carry_box(p, flow), p.score * PROPAGATED_SCORE, p.propagated + 1)
                   for p in previous if p.propagated < FLOW_MAX_GAP]
        carried = [c for c in carried if _inside_frame(c[0], image_shape)]
        if carried:
            boxes = np.concatenate([boxes, np.stack([c[0] for c in carried])])
            scores = np.concatenate([scores, [c[1] for c in carried]])
            streak = np.concatenate([streak, [c[2] for c in carried]])
    if len(boxes) == 0:
        return boxes, scores, streak
    corners = torch.as_tensor(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1), dtype=torch.float32)
    # a tiny bonus keeps a detection ahead of a propagated box of the same score
    ranked = torch.as_tensor(np.asarray(scores, np.float64) + 1e-6 * (streak == 0), dtype=torch.float32)
    keep = nms(corners, ranked, NMS_IOU).numpy()
    keep = np.sort(keep)
    return boxes[keep], scores[keep], streak[keep]


def carry_box(person: Tracked, flow: np.ndarray) -> np.ndarray:
    """The person's box in the next frame: shifted by the median flow at its confident joints (scoring at least
    FLOW_JOINT_SCORE). Simple Baselines draws the box around the moved joints instead (`flow.propagate_box`),
    15% larger; around the crowds' thin figures that box is narrower than the detector's box of the same
    person (joints lie on the limbs' centre lines), so NMS at 0.5 kept both and every person got a twin
    track. The shifted box keeps the detection's shape."""
    confident = np.where(person.joints[:, 2:] >= FLOW_JOINT_SCORE, person.joints[:, :2], np.nan)
    moved = optical_flow.propagate_joints(confident, flow) - confident
    if not np.isfinite(moved).all(1).any():
        return person.box.copy()
    dx, dy = np.nanmedian(moved, axis=0)
    return person.box + np.array([dx, dy, 0.0, 0.0])


def _inside_frame(box, shape) -> bool:
    """Whether a box overlaps the frame by at least a quarter of its area."""
    x, y, w, h = box
    inter = max(0.0, min(x + w, shape[1]) - max(x, 0.0)) * max(0.0, min(y + h, shape[0]) - max(y, 0.0))
    return w > 0 and h > 0 and inter >= 0.25 * w * h


def track_video(video: Video, detect, estimate, cfg: TrackConfig, progress=None) -> list[list[Tracked]]:
    """The tracked people of every frame of a video (`detect(image) -> {"boxes" xyxy, "scores"}`, `estimate(
    image, boxes xywh) -> (n, J, 3)`)."""
    tracker = Tracker(max_age=cfg.max_age, iou_threshold=cfg.iou_threshold, appearance_weight=cfg.appearance_weight)
    frames: list[list[Tracked]] = []
    previous_image = None
    for frame in video.frames:
        image = frame.image()
        found = detect(image)
        keep = found["scores"] >= cfg.detection_threshold
        found = {"boxes": found["boxes"][keep], "scores": found["scores"][keep]}
        flow = None
        if cfg.flow != "none" and previous_image is not None and previous_image.shape == image.shape:
            flow = optical_flow.dense_flow(previous_image, image, cfg.flow)
        boxes, scores, streak = detections_with_propagated(found, frames[-1] if frames else [], flow, image.shape)
        joints = estimate(image, boxes)
        embeddings = (np.stack([appearance_embedding(image, b) for b in boxes]) if cfg.appearance_weight > 0
                      and len(boxes) else None)
        matches = tracker.update(boxes, scores, embeddings)
        frames.append([Tracked(track_id, boxes[i], float(scores[i]), joints[i], int(streak[i]))
                       for track_id, i in matches])
        previous_image = image
        if progress is not None:
            progress(1)
    if cfg.smooth:
        smooth_in_place(frames)
    return frames


def smooth_in_place(frames: list[list[Tracked]]) -> None:
    """Each track's joints smoothed over the frames it is in (`flow.smooth_tracks`); scores kept."""
    ids = sorted({p.track_id for people in frames for p in people})
    for track_id in ids:
        where = [(t, p) for t, people in enumerate(frames) for p in people if p.track_id == track_id]
        series = np.full((len(frames), where[0][1].joints.shape[0], 2), np.nan)
        for t, p in where:
            series[t] = p.joints[:, :2]
        smoothed = optical_flow.smooth_tracks(series)
        for t, p in where:
            p.joints = np.concatenate([smoothed[t], p.joints[:, 2:]], 1)


# ------------------------------------------------------------------ outputs
def posetrack_predictions(video: Video, frames: list[list[Tracked]], joint_threshold: float = 0.0) -> dict:
    """The tracks as a PoseTrack JSON dict (the input's frame list; keypoints [x, y, score], joints below
    `joint_threshold` written as 0, 0, 0)."""
    images, annotations = [], []
    for frame, people in zip(video.frames, frames):
        name = frame.path.name if frame.path is not None else f"{frame.image_id:06d}"
        images.append({"file_name": str(frame.path) if frame.path is not None else name, "id": frame.image_id,
                       "frame_id": frame.image_id, "vid_id": video.name, "nframes": len(video.frames)})
        for p in people:
            kept = p.joints[:, 2] >= joint_threshold
            keypoints = np.where(kept[:, None], p.joints, 0.0)
            annotations.append({"id": len(annotations) + 1, "image_id": frame.image_id, "category_id": 1,
                                "track_id": p.track_id, "bbox": [round(float(v), 2) for v in p.box],
                                "keypoints": [round(float(v), 3) for v in keypoints.ravel()],
                                "scores": [round(float(s), 4) for s in p.joints[:, 2]]})
    category = {"supercategory": "person", "id": 1, "name": "person", "keypoints": list(video.joints),
                "skeleton": [[a + 1, b + 1] for a, b in video.skeleton]}
    return {"images": images, "annotations": annotations, "categories": [category]}


def ground_truth_frames(video: Video) -> dict:
    """{image id: [{"track_id", "keypoints", "bbox_head"}]}: the annotated frames, as the metrics take them."""
    return {f.image_id: [{"track_id": p.track_id, "keypoints": p.keypoints, "bbox_head": p.bbox_head}
                         for p in f.people if p.bbox_head is not None] for f in video.frames}


def predicted_frames(predictions: dict, joint_threshold: float = 0.0) -> dict:
    """{image id: [{"track_id", "keypoints" (J, 3) x, y, score}]} of a PoseTrack prediction dict; joints written
    as 0, 0, 0 (or below `joint_threshold`) are not predicted (NaN)."""
    frames = {image["id"]: [] for image in predictions["images"]}
    for ann in predictions["annotations"]:
        keypoints = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
        scores = np.asarray(ann.get("scores") or keypoints[:, 2], np.float64)
        missing = (keypoints[:, 2] <= 0) | (scores < joint_threshold)
        keypoints[missing, :2] = np.nan
        keypoints[:, 2] = scores
        frames.setdefault(ann["image_id"], []).append({"track_id": ann["track_id"], "keypoints": keypoints})
    return frames


TRACK_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                          [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0]])


def write_gif(path: Path, video: Video, frames: list[list[Tracked]], scale: int = 3,
              joint_threshold: float = 0.0) -> None:
    """The video with each track's skeleton drawn in its colour (Sasha Trubetskoy's distinct colours, cycled)."""
    from PIL import Image, ImageDraw

    pictures = []
    for frame, people in zip(video.frames, frames):
        picture = Image.fromarray(frame.image()).resize(
            (frame.image().shape[1] * scale, frame.image().shape[0] * scale), Image.NEAREST)
        draw = ImageDraw.Draw(picture)
        for p in people:
            colour = tuple(int(c) for c in TRACK_COLOURS[(p.track_id - 1) % len(TRACK_COLOURS)])
            xy, ok = p.joints[:, :2] * scale, p.joints[:, 2] >= joint_threshold
            for a, b in video.skeleton:
                if ok[a] and ok[b]:
                    draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=2)
            x, y, w, h = p.box * scale
            draw.rectangle([x, y, x + w, y + h], outline=colour)
            draw.text((x + 2, y + 1), str(p.track_id), fill=colour)
        pictures.append(picture)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=80, loop=0)


# ------------------------------------------------------------------ the run
def run_tracking(cfg: TrackConfig) -> dict:
    """Track every video of `cfg.data`; write tracks/, videos/ and (for annotated data) metrics.json."""
    from ..detection.evaluate import detect as run_detector
    from ..detection.evaluate import load_detector

    if cfg.flow not in (*optical_flow.FLOW_METHODS, "none"):
        raise ValueError(f"unknown --flow {cfg.flow!r}: choose one of {', '.join(optical_flow.FLOW_METHODS)} or none")
    rt = Runtime.create(cfg.device, "fp32")
    detector, _ = load_detector(cfg.detector, rt.device)
    estimate = PoseEstimator(cfg.pose, rt.scoring(), cfg.flip_test)
    videos = load_videos(cfg.data)
    if estimate.joint_names and any(tuple(v.joints) != estimate.joint_names for v in videos if v.annotated):
        raise ValueError(f"{cfg.data} annotates joints {list(videos[0].joints)} but the pose model predicts "
                         f"{list(estimate.joint_names)}: use a pose model trained on these joints")
    for video in videos:
        if not video.annotated:
            video.joints = estimate.joint_names or video.joints
    run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("track", Path(cfg.detector).name, f"s{cfg.seed}"))
    write_json(run_dir / "config.json", {"task": "tracking", **dataclasses.asdict(cfg)})

    def detect(image: np.ndarray) -> dict:
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        return run_detector(detector, [tensor], rt.device)[0]

    total = sum(len(v.frames) for v in videos)
    logger = RunLogger(run_dir, total=total, desc="track", progress=cfg.progress)
    start, outputs = time.time(), []
    try:
        for video in videos:
            frames = track_video(video, detect, estimate, cfg, progress=logger.advance)
            predictions = posetrack_predictions(video, frames, cfg.joint_threshold)
            write_json(run_dir / "tracks" / f"{video.name}.json", predictions)
            if cfg.video:
                write_gif(run_dir / "videos" / f"{video.name}.gif", video, frames, joint_threshold=cfg.joint_threshold)
            outputs.append((video, predictions))
    finally:
        logger.close()
    metrics = {"task": "tracking", "data": cfg.data, "videos": len(videos), "frames": total,
               "tracks": int(sum(len({a["track_id"] for a in p["annotations"]}) for _, p in outputs)),
               "frames_per_second": total / max(time.time() - start, 1e-9), "run_dir": str(run_dir)}
    annotated = [(v, p) for v, p in outputs if v.annotated]
    if annotated:
        metrics.update(score_tracks(annotated, cfg.joint_threshold))
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def score_tracks(pairs: list[tuple[Video, dict]], joint_threshold: float = 0.0) -> dict:
    """PoseTrack's metrics of predicted PoseTrack dicts against their annotated videos, the joints scoring below
    `joint_threshold` left out (as a run with that --joint-threshold writes them)."""
    scores = pose_tracking_metrics([ground_truth_frames(v) for v, _ in pairs],
                                   [predicted_frames(p, joint_threshold) for _, p in pairs],
                                   joint_names=list(pairs[0][0].joints))
    return {"mota": scores["mota"]["total"], "motp": scores["motp"]["total"], "ap": scores["ap"]["total"],
            "precision": scores["precision"]["total"], "recall": scores["recall"]["total"],
            "id_switches": scores["id_switches"], "per_joint": {k: scores[k] for k in ("mota", "motp", "ap")}}


def evaluate_tracks(tracks, data: str) -> dict:
    """`workbench evaluate --task tracking`: the PoseTrack files in `tracks` (a `workbench track` run or its
    tracks/ folder) against the annotated videos of `data`, matched by video name."""
    folder = Path(tracks)
    folder = folder / "tracks" if (folder / "tracks").is_dir() else folder
    files = {p.stem: p for p in folder.glob("*.json")} if folder.is_dir() else {}
    if not files:
        raise ValueError(f"{tracks}: no PoseTrack JSON tracks in it: give the run directory of `workbench track` "
                         f"or a folder of its tracks")
    videos = [v for v in load_videos(data) if v.annotated]
    missing = [v.name for v in videos if v.name not in files]
    if missing:
        raise ValueError(f"{folder} has no tracks for video {missing[0]} of {data} ({len(missing)} missing): track "
                         f"the same data")
    pairs = [(v, json.loads(files[v.name].read_text())) for v in videos]
    return {"task": "tracking", "data": data, "tracks": str(folder), "videos": len(pairs), **score_tracks(pairs)}

