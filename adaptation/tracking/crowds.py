"""The built-in crowd-tracking benchmark: short videos of stick figures that walk, cross and hide each other.

Each video is FRAMES (64) frames of the figures' IMAGE_SIZE x IMAGE_SIZE canvas (128 x 128) and holds
PERSONS (3-5) people of the figures family (the same body, strokes, joints, visibility and boxes as
`adaptation.pose.figures`), each walking at its own constant speed (SPEED pixels a frame, left or
right, with a slight drift up or down) along its own ground line, swinging legs and arms in a gait
whose cycle is STRIDE body heights of travel. People are HEIGHT (36-64) pixels tall, so that several
fit the canvas side by side; they enter and leave the frame, pass in front of and behind each other
(nearer people, whose feet are lower in the frame, are drawn later and hide the farther ones), and a
person keeps one appearance for the whole video, as a tracker's appearance model expects. The two
domains draw the motion from the SAME distributions and differ in appearance only, as the figures do:

- `flat`     (the source): flat part colours on one plain background colour.
- `textured` (the target): parts filled with textures that move with their person, over a still
             photo or tinted texture with distractor strokes, then the video's blur and fresh sensor
             noise in every frame.

Annotations follow PoseTrack 2018's JSON layout, one file per video, so that a user's PoseTrack data
loads the same way (`load_video`): `images` (file_name relative to the dataset root, id, frame_id,
vid_id, nframes, is_labeled), `annotations` (track_id from 0 per video, image_id, keypoints
[x, y, v] x 14 with COCO's v: 0 not in the frame, 1 hidden, 2 visible, `bbox` of the person's own
pixels, `bbox_head` the head disc's box, which PoseTrack's PCKh threshold scales with) and
`categories`. A person is annotated in a frame when at least MIN_JOINTS_IN_FRAME of its joints lie
in the frame.

Each video has its own random streams (domain seed, split, video), so videos never depend on how many
were built before them. Built once and cached under $WORKBENCH_DATA/crowds (default
~/.cache/workbench/crowds) as `<domain>-v<VERSION>[-n<train>-<test>][-val<val>][-f<frames>]/` holding
`images/<split>/<video>/<frame>.png` and `annotations/<split>/<video>.json`; the folder is written
under a temporary name and renamed when complete. Smaller sets (for tests) come from
`build_domain(..., n_train=, n_test=, n_val=, frames=)` or WORKBENCH_CROWDS_N="<train>,<test>[,<val>]" and
WORKBENCH_CROWDS_FRAMES.
`builtin:crowds/<domain>[:train|val|test]` names a split wherever tracking data is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .. import common
from ..pose import figures
from ..pose.figures import IMAGE_SIZE, JOINTS, PARTS, SKELETON, SPLITS, check_split

DOMAINS = ("flat", "textured")
VERSION = 1
FRAMES = 64
TRAIN_VIDEOS, TEST_VIDEOS = 16, 8     # val: as many as test
COUNTS_VARIABLE = "WORKBENCH_CROWDS_N"
FRAMES_VARIABLE = "WORKBENCH_CROWDS_FRAMES"
SEEDS = {"flat": 41, "textured": 42}
SPLIT_STREAM = {"train": 0, "test": 1, "val": 2}
PERSONS = (3, 5)                      # people per video, inclusive
HEIGHT = (36.0, 64.0)                 # standing height in pixels
SPEED = (0.6, 2.0)                    # pixels a frame along the walking direction
DRIFT = 0.15                          # up to this many pixels a frame up or down
GROUND = (0.45, 1.05)                 # a person's ground line (feet), as a fraction of the canvas height
STRIDE = 1.4                          # body heights travelled in one gait cycle (two steps)
HIP_SWING = (18.0, 28.0)              # degrees either side of hanging, forwards and back
KNEE_FLEX = (30.0, 55.0)              # the swinging leg's largest knee bend
ARM_SWING = 0.6                       # an arm swings this share of the opposite leg's swing
ELBOW_FLEX = (10.0, 35.0)
LEAN = 6.0                            # degrees: a walker leans forwards by up to this much
MIN_JOINTS_IN_FRAME = 3
CATEGORY_ID = 1


def cache_dir() -> Path:
    return common.cache_dir("crowds")


def check_domain(domain: str) -> str:
    return common.check_domain(domain, DOMAINS, "crowds")


# ------------------------------------------------------------------ walkers
@dataclasses.dataclass(frozen=True, eq=False)
class Walker:
    """One person of a video: body and stroke sizes, the path of the neck (start, velocity), the gait."""
    size: dict
    radius: dict
    start: np.ndarray         # (x, y) of the neck at frame 0
    velocity: np.ndarray      # pixels a frame
    height: float
    hip_swing: float
    knee_flex: float
    elbow_flex: float
    lean: float               # radians, signed towards the walking direction
    phase: float              # gait phase at frame 0
    left_first: bool

    @property
    def heading(self) -> float:
        return 1.0 if self.velocity[0] >= 0 else -1.0

    def ground(self, frame: int) -> float:
        """The y of the feet's line at `frame`: nearer people stand lower in the frame."""
        return float(self.start[1] + self.velocity[1] * frame + self.height * 0.81)

    def figure(self, frame: int) -> figures.Figure:
        """The figure at `frame`: a walking pose placed at the neck's position on the path."""
        travelled = abs(float(self.velocity[0])) * frame
        phase = self.phase + 2 * np.pi * travelled / (STRIDE * self.height)
        joints = walking_joints(self, phase) + self.start + self.velocity * frame
        return figures.Figure(np.round(joints, 2), self.radius, (False, False), self.left_first)


def sample_walker(rng: np.random.Generator) -> Walker:
    """A person with a random body, path and gait; the path crosses the canvas at some point of the video
    or of the frames just before or after it, so that people enter and leave."""
    height = rng.uniform(*HEIGHT)
    size = figures.body_sizes(rng, height)
    radius = figures.stroke_radii(rng, height, size)
    heading = rng.choice((-1.0, 1.0))
    speed = rng.uniform(*SPEED)
    velocity = np.array([heading * speed, rng.uniform(-DRIFT, DRIFT)])
    neck_y = rng.uniform(*GROUND) * IMAGE_SIZE - 0.81 * height
    centre_frame = rng.uniform(-0.25, 1.25) * FRAMES   # when the person passes a random point of the canvas
    x_then = rng.uniform(0.1, 0.9) * IMAGE_SIZE
    start = np.array([x_then - velocity[0] * centre_frame, neck_y])
    return Walker(size, radius, start, velocity, height, rng.uniform(*HIP_SWING), rng.uniform(*KNEE_FLEX),
                  rng.uniform(*ELBOW_FLEX), np.radians(heading * rng.uniform(0, LEAN)), rng.uniform(0, 2 * np.pi),
                  bool(rng.random() < 0.5))


def walking_joints(walker: Walker, phase: float) -> np.ndarray:
    """The pose at a gait phase, neck at the origin: the legs swing forwards and back in antiphase, the
    swinging leg bends its knee backwards, each arm swings with the opposite leg and bends forwards.
    Angles are taken in the image's x direction and turned into the kinematic chain's side-relative ones
    (positive = away from the body: the figure's left is the image's right)."""
    heading = walker.heading
    legs = {"left": walker.hip_swing * np.sin(phase), "right": -walker.hip_swing * np.sin(phase)}
    knees = {"left": walker.knee_flex * max(0.0, np.sin(phase + np.pi / 2)),
             "right": walker.knee_flex * max(0.0, np.sin(phase - np.pi / 2))}
    limbs = {}
    for name, side, other in (("left", 1.0, "right"), ("right", -1.0, "left")):
        thigh = heading * legs[name]                      # + = forwards, in image x
        shin = thigh - heading * knees[name]              # the knee folds backwards
        upper_arm = heading * ARM_SWING * legs[other]
        forearm = upper_arm + heading * walker.elbow_flex  # the elbow folds forwards
        limbs[name] = figures.LimbAngles(side * upper_arm, 1.0, side * forearm, 1.0, side * thigh, 1.0,
                                         side * shin, 1.0)
    return figures.pose_joints(walker.size, walker.lean, 0.0, 1.0, limbs["left"], limbs["right"])


# ------------------------------------------------------------------ appearances
@dataclasses.dataclass
class Scene:
    """A video's look: the still background, each person's part fills (colour (3,) or a (S, S, 3) texture
    that moves with the person's neck), and the camera's blur radius (0: none) and noise level."""
    background: np.ndarray
    fills: list[dict]
    blur: float = 0.0
    noise: float = 0.0


def flat_scene(rng: np.random.Generator, people: int) -> Scene:
    background = rng.integers(0, 256, 3).astype(np.float64)
    return Scene(np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy(),
                 [person_fills(rng, lambda: np.round(figures.contrasting_colour(rng, common.luma(background))))
                  for _ in range(people)])


def textured_scene(rng: np.random.Generator, people: int) -> Scene:
    background = figures._distractors(rng, figures.textured_background(rng))
    under = common.luma(background.reshape(-1, 3).mean(0))
    whole = (slice(0, IMAGE_SIZE), slice(0, IMAGE_SIZE))
    fills = [person_fills(rng, lambda: figures.textured_fill(rng, figures.contrasting_colour(rng, under), whole))
             for _ in range(people)]
    blur = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.5 else 0.0
    return Scene(background, fills, blur, float(rng.uniform(0, 8)))


def person_fills(rng: np.random.Generator, make) -> dict:
    """One fill for the whole person (SINGLE_COLOUR of them, as the figures) or one per part."""
    if rng.random() < figures.SINGLE_COLOUR:
        fill = make()
        return {part: fill for part in PARTS}
    return {part: make() for part in PARTS}


def moved_fill(fill: np.ndarray, neck: np.ndarray) -> np.ndarray:
    """A colour as it is; a texture laid on the canvas with its centre at the person's neck (edge pixels
    repeated beyond it), so that the texture moves with the person."""
    if fill.ndim == 1:
        return fill
    offset = np.round(neck).astype(int) - IMAGE_SIZE // 2
    rows = np.clip(np.arange(IMAGE_SIZE) - offset[1], 0, IMAGE_SIZE - 1)
    cols = np.clip(np.arange(IMAGE_SIZE) - offset[0], 0, IMAGE_SIZE - 1)
    return fill[rows[:, None], cols[None, :]]


# ------------------------------------------------------------------ rendering
def video_rng(domain: str, split: str, video: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([SEEDS[check_domain(domain)], SPLIT_STREAM[check_split(split)], video, stream])


def video_people(domain: str, split: str, video: int) -> tuple[list[Walker], Scene]:
    rng = video_rng(domain, split, video)
    walkers = [sample_walker(rng) for _ in range(int(rng.integers(PERSONS[0], PERSONS[1] + 1)))]
    scene = (flat_scene if domain == "flat" else textured_scene)(rng, len(walkers))
    return walkers, scene


def render_frame(walkers: list[Walker], scene: Scene, frame: int,
                 noise_rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[dict]]:
    """(image (S, S, 3) uint8, PoseTrack annotation fields with `track_id` of the people in the frame)."""
    people = [(index, walker.figure(frame)) for index, walker in enumerate(walkers)]
    people = [(i, f) for i, f in people if figures.joints_in_frame(f.joints).sum() >= MIN_JOINTS_IN_FRAME]
    people.sort(key=lambda p: (walkers[p[0]].ground(frame), p[0]))   # far (higher feet) first, near last
    placed = [f for _, f in people]
    layers = figures.stroke_layers(placed)
    fills = [{part: moved_fill(fill, f.joints[figures.NECK]) for part, fill in scene.fills[i].items()}
             for i, f in people]
    image = np.round(np.clip(figures.composite(scene.background.copy(), layers, fills), 0, 255)).astype(np.uint8)
    if scene.blur:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(scene.blur)))
    if scene.noise and noise_rng is not None:
        noise = scene.noise * noise_rng.standard_normal(image.shape, dtype=np.float32)
        image = np.round(np.clip(image + noise, 0, 255)).astype(np.uint8)
    visibility = figures.joint_visibility(placed, layers)
    silhouettes = figures.figure_silhouettes(len(placed), layers)
    annotations = []
    for (index, figure), flags, silhouette in zip(people, visibility, silhouettes):
        if not silhouette.any():
            continue
        fields = figures.figure_annotation(figure, flags, silhouette)
        head, r = figure.joints[figures.HEAD], figure.radius["head"]
        fields["bbox_head"] = [round(float(head[0] - r), 2), round(float(head[1] - r), 2), round(2 * r, 2),
                               round(2 * r, 2)]
        annotations.append({"track_id": index, **fields})
    annotations.sort(key=lambda a: a["track_id"])
    return image, annotations


def render_video(domain: str, split: str, video: int, frames: int = FRAMES):
    """Yield (image, annotations) for every frame of one video."""
    walkers, scene = video_people(domain, split, video)
    noise_rng = video_rng(domain, split, video, stream=1)
    for frame in range(frames):
        yield render_frame(walkers, scene, frame, noise_rng)


# ------------------------------------------------------------------ PoseTrack files
def video_name(video: int) -> str:
    return f"{video + 1:06d}"


def image_id(video: int, frame: int) -> int:
    """PoseTrack's numbering: 1 VVVVVV FFFF (video, frame)."""
    return int(f"1{video + 1:06d}{frame:04d}")


def category() -> dict:
    return {"supercategory": "person", "id": CATEGORY_ID, "name": "person", "keypoints": list(JOINTS),
            "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}


def _write_video(root: Path, domain: str, split: str, video: int, frames: int) -> None:
    name = video_name(video)
    folder = root / "images" / split / name
    folder.mkdir(parents=True)
    images, annotations = [], []
    for frame, (image, people) in enumerate(render_video(domain, split, video, frames)):
        file_name = f"images/{split}/{name}/{frame:06d}.png"
        Image.fromarray(image).save(root / file_name, compress_level=1)
        ident = image_id(video, frame)
        images.append({"file_name": file_name, "id": ident, "frame_id": ident, "vid_id": name, "nframes": frames,
                       "is_labeled": True, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for person in people:
            annotations.append({"id": len(annotations) + 1 + ident * 100, "image_id": ident,
                                "category_id": CATEGORY_ID, "scores": [], **person})
    data = {"info": {"description": f"built-in crowds, domain {domain}, {split} split, video {name}",
                     "version": VERSION},
            "images": images, "annotations": annotations, "categories": [category()]}
    out = root / "annotations" / split
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data))


def video_counts(n_train: int | None = None, n_test: int | None = None,
                 n_val: int | None = None) -> tuple[int, int, int]:
    """(train, val, test) videos: arguments, else WORKBENCH_CROWDS_N, else 16 / 8 / 8."""
    return common.split_counts(COUNTS_VARIABLE, (TRAIN_VIDEOS, TEST_VIDEOS), "crowd video", n_train, n_test, n_val)


def frame_count(frames: int | None = None) -> int:
    """Frames per video: the argument, else WORKBENCH_CROWDS_FRAMES, else FRAMES (64)."""
    if frames is None:
        text = os.environ.get(FRAMES_VARIABLE, "").strip()
        try:
            frames = int(text) if text else FRAMES
        except ValueError:
            raise ValueError(f"{FRAMES_VARIABLE}={text!r}: expected a number of frames, e.g. 16") from None
    if frames < 2:
        raise ValueError(f"a crowd video needs at least 2 frames, got {frames}")
    return frames


def domain_dir(domain: str, n_train: int | None = None, n_test: int | None = None, n_val: int | None = None,
               frames: int | None = None) -> Path:
    frames = frame_count(frames)
    suffix = common.counts_suffix(video_counts(n_train, n_test, n_val), (TRAIN_VIDEOS, TEST_VIDEOS))
    return cache_dir() / f"{check_domain(domain)}-v{VERSION}{suffix}{'' if frames == FRAMES else f'-f{frames}'}"


def _is_built(folder: Path) -> bool:
    return (folder / "complete.json").is_file()


def build_domain(domain: str, force: bool = False, n_train: int | None = None, n_test: int | None = None,
                 n_val: int | None = None, frames: int | None = None) -> Path:
    """Build (or reuse) the cached videos of one domain; returns the dataset root (holding images/ and
    annotations/). Built under a temporary name and renamed into place when complete."""
    frames = frame_count(frames)
    folder = domain_dir(domain, n_train, n_test, n_val, frames)
    if _is_built(folder) and not force:
        return folder
    counts = dict(zip(SPLITS, video_counts(n_train, n_test, n_val)))

    def write(tmp: Path) -> None:
        for split in SPLITS:
            for video in range(counts[split]):
                _write_video(tmp, domain, split, video, frames)
        (tmp / "complete.json").write_text(json.dumps({"videos": counts, "frames": frames, "version": VERSION}))

    return common.build_folder(folder, write, _is_built, force)


def video_files(domain: str, split: str, **counts) -> list[Path]:
    """The PoseTrack JSON files of a built-in split, building the domain if needed."""
    root = build_domain(domain, **counts)
    return sorted((root / "annotations" / check_split(split)).glob("*.json"))


def coco_file(domain: str, split: str, **counts) -> Path:
    """The split's people of every video as one COCO keypoint file (file names relative to the dataset root),
    for the pose family's readers: a pose model adapted on the crowds' own frames (`builtin:crowds/<domain>`
    as pose data). Written once, beside the videos."""
    root = build_domain(domain, **counts)
    path = root / f"coco_{check_split(split)}.json"
    if path.is_file():
        return path
    images, annotations, category_ = [], [], category()
    for video in video_files(domain, split, **counts):
        data = json.loads(video.read_text())
        images += [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in data["images"]]
        annotations += [{**a, "id": len(annotations) + n + 1} for n, a in enumerate(data["annotations"])]
    text = json.dumps({"info": {"description": f"built-in crowds, domain {domain}, {split} split, every video"},
                       "images": images, "annotations": annotations, "categories": [category_]})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
