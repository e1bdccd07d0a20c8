"""Videos for pose tracking: PoseTrack JSON (the built-in crowds or a user's PoseTrack data), a video file or
a folder of frames.

A PoseTrack 2018 annotation file describes one video: `images` (its frames; `file_name` relative to the
dataset root, the folder that holds `images/` and `annotations/`), `annotations` (one person in one frame:
`track_id`, `keypoints` [x, y, v] per joint, `bbox`, `bbox_head`) and `categories` (the joint names and the
skeleton). `load_video` reads one into a `Video`; `load_videos` resolves what `--data` names:

    builtin:crowds/<domain>[:train|val|test]   the built-in crowds (default split: test)
    path/to/video.json                         one PoseTrack file (root: the folder above annotations/)
    path/to/annotations/val/                   every PoseTrack file in a folder
    path/to/clip.mp4 | clip.gif | frames/      frames without annotations (for `workbench track`)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..common import IMAGE_EXTENSIONS, DataError, read_image
from . import crowds

BUILTIN = "builtin:crowds/"
DEFAULT_SPLIT = "test"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


@dataclasses.dataclass
class Person:
    """One person in one frame: joints (J, 3) as x, y and v (ground truth: COCO's flag, 0 = not annotated) or
    a confidence (predictions); the person's box [x, y, w, h]; the head box PCKh scales with."""
    track_id: int
    keypoints: np.ndarray
    bbox: np.ndarray | None = None
    bbox_head: np.ndarray | None = None
    score: float = 1.0


@dataclasses.dataclass
class Frame:
    path: Path | None           # None for a frame decoded from a video file
    image_id: int
    people: list[Person]
    pixels: np.ndarray | None = None   # (H, W, 3) uint8, for a frame decoded from a video file

    def image(self) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels
        return np.array(read_image(self.path, self.path.parent, what="frame"))   # a writable copy


@dataclasses.dataclass
class Video:
    name: str
    frames: list[Frame]
    joints: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]   # pairs of joint indices (from 0)
    annotated: bool = True
    source: str = ""


def default_root(json_path: Path) -> Path:
    """The dataset root of a PoseTrack file: the folder above `annotations/` (root/annotations/<split>/x.json),
    else the file's own folder."""
    for parent in json_path.parents:
        if parent.name == "annotations":
            return parent.parent
    return json_path.parent


def load_video(json_path, root=None) -> Video:
    """One PoseTrack file; every frame it names must exist under `root` (a one-line error otherwise)."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: not a readable PoseTrack JSON file ({exc}): check the path") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise DataError(f"{json_path}: no {', '.join(missing)} in it: a PoseTrack file has images, annotations "
                        f"and categories")
    root = Path(root) if root is not None else default_root(json_path)
    joints = tuple(data["categories"][0]["keypoints"])
    skeleton = tuple((a - 1, b - 1) for a, b in data["categories"][0].get("skeleton", []))
    people: dict[int, list[Person]] = {}
    for ann in data["annotations"]:
        keypoints = np.asarray(ann.get("keypoints", []), np.float64).reshape(-1, 3)
        if len(keypoints) != len(joints):
            raise DataError(f"{json_path}: annotation {ann.get('id')} has {len(keypoints)} joints, the category "
                            f"names {len(joints)}: fix the file")
        people.setdefault(ann["image_id"], []).append(Person(
            int(ann["track_id"]), keypoints, _box(ann.get("bbox")), _box(ann.get("bbox_head")),
            float(np.mean(ann["scores"])) if ann.get("scores") else 1.0))
    frames = []
    for image in sorted(data["images"], key=lambda im: im.get("frame_id", im["id"])):
        path = root / image["file_name"]
        if not path.is_file():
            raise DataError(f"{json_path}: frame {image['file_name']} does not exist under {root}: restore it or "
                            f"give the dataset root (the folder that holds images/)")
        frames.append(Frame(path, int(image["id"]), people.get(image["id"], [])))
    name = str(data["images"][0].get("vid_id", json_path.stem)) if data["images"] else json_path.stem
    return Video(name, frames, joints, skeleton, True, str(json_path))


def _box(values) -> np.ndarray | None:
    return None if not values else np.asarray(values, np.float64)


def builtin_split(spec: str) -> tuple[str, str]:
    """(domain, split) of `builtin:crowds/<domain>[:split]`."""
    domain, _, split = spec[len(BUILTIN):].partition(":")
    return crowds.check_domain(domain), crowds.check_split(split or DEFAULT_SPLIT)


def load_videos(spec: str, split: str | None = None, **counts) -> list[Video]:
    """Every video `spec` names (see the module's docstring); `split` overrides a built-in spec's split."""
    if spec.startswith(BUILTIN):
        domain, named = builtin_split(spec)
        return [load_video(path) for path in crowds.video_files(domain, split or named, **counts)]
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder: give builtin:crowds/<domain>, a PoseTrack JSON file or "
                        f"folder, a video file or a folder of frames")
    if path.is_file() and path.suffix.lower() == ".json":
        return [load_video(path)]
    if path.is_file():
        return [read_video_file(path)]
    jsons = sorted(path.glob("*.json"))
    if jsons:
        return [load_video(p) for p in jsons]
    return [read_frames_folder(path)]


def read_frames_folder(folder: Path) -> Video:
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not frames:
        raise DataError(f"{folder}: no PoseTrack JSON files and no images ({', '.join(IMAGE_EXTENSIONS)}) in it: "
                        f"give a folder of frames or of PoseTrack files")
    return Video(folder.name, [Frame(p, i, []) for i, p in enumerate(frames)], crowds.JOINTS, crowds.SKELETON,
                 annotated=False, source=str(folder))


def read_video_file(path: Path) -> Video:
    """Decode every frame of a video file (GIF through Pillow, others through OpenCV) into memory."""
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise DataError(f"{path}: not a video ({', '.join(VIDEO_EXTENSIONS)}), a PoseTrack JSON file or a folder: "
                        f"convert it to MP4 or give a folder of frames")
    pixels = _gif_frames(path) if path.suffix.lower() == ".gif" else _opencv_frames(path)
    if not pixels:
        raise DataError(f"{path}: cannot read any frame of this video: convert it to MP4 (H.264) or give a folder "
                        f"of frames")
    return Video(path.stem, [Frame(None, i, [], p) for i, p in enumerate(pixels)], crowds.JOINTS, crowds.SKELETON,
                 annotated=False, source=str(path))


def _gif_frames(path: Path) -> list[np.ndarray]:
    frames = []
    try:
        with Image.open(path) as gif:
            for index in range(getattr(gif, "n_frames", 1)):
                gif.seek(index)
                frames.append(np.asarray(gif.convert("RGB")))
    except OSError:
        return []
    return frames


def _opencv_frames(path: Path) -> list[np.ndarray]:
    import cv2

    capture, frames = cv2.VideoCapture(str(path)), []
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return frames
