"""The built-in dense benchmark: scenes of several digits with per-pixel labels, from packaged data only.

Every scene is a SIZE x SIZE (64 x 64) RGB canvas holding 3-5 digits that do not overlap (their
boxes keep a 2-pixel gap), each 16-26 pixels tall and turned by up to 10 degrees. Eleven classes:
0 = background, 1..10 = the digits 0..9 (class = digit + 1). The digit shapes come from the same
sources as the built-in digits (`adaptation.digits`): printed glyphs of matplotlib's bundled
TrueType faces (70%) and scikit-learn's handwritten UCI digits (30%). The two domains draw their
shapes, sizes, rotations, counts and layouts from the SAME distributions; only the appearance
changes, so that the shift is real but a model's shape knowledge still transfers:

- `printed`  (the source): one flat ink colour on one flat paper colour per scene, random colours
             of either polarity (luma contrast above 80, as the built-in `fonts` digits), crisp
             anti-aliased edges, nothing else in the scene. A source with one polarity (dark on
             light only) would leave a model at chance on inverted digits, as the handwritten
             digits are on the coloured prints of the classification benchmark.
- `textured` (the target): the digits painted in random colours of either polarity (chosen to
             contrast with the background under each digit) over crops of scikit-image's photos
             and tinted textures at random zoom, with 1-3 clutter strokes (lines and arcs,
             labelled background) drawn under the digits, then blur and sensor noise. A source
             model meets unseen colours, inverted polarity, textured backgrounds and digit-like
             strokes, while the digits keep their printed shapes.

Labels are digit regions, as object segmentation labels objects: a pixel is ink where the digit's
coverage (computed exactly: the glyph is drawn large and area-averaged down to its size, and the
image uses the same coverage as the ink's alpha) is at least INK (0.5); a digit's region is its ink
grown by REGION_RADIUS (2) pixels with enclosed holes filled, labelled digit + 1. The one-pixel rim
outside each region, and the rare pixel that two regions both claim, are IGNORE (255); everything
else is background 0. (Versions 1-2 labelled only the 2-4 pixel ink strokes: stride-4 and stride-8
models trained from scratch on a CPU barely left all-background on them.) The handwritten digits
(8 x 8 grey levels 0..16) are upsampled smoothly and their ink is the level ramp 4..12 mapped to
coverage 0..1 (half at level 8).

Calibration (v3, before the val split, so selected on printed:test): a dtn + fcn source model (the
one-conv fcn head of before issue 34; Adam, 8 epochs, 1500 iterations, seed 0) scores 31.2 mIoU on
printed:test (background 97.2, digits 9.9-47.4) and 19.9 on textured:test, against 6.4 for predicting
all background: the shift costs a third of the in-domain figure and leaves room to adapt.

Train, val and test scenes come from separate random streams (one per domain and split, one per
scene), so the three splits are disjoint draws and adding val left every train and test scene as it
was. The handwritten digits of test scenes are the UCI test split of `adaptation.digits`; train AND
val scenes draw theirs from the UCI train split (val is for choosing checkpoints and settings, so the
test glyphs stay test-only): no handwritten instance of a test scene appears in a train or val scene
(a val scene may hold an instance that some train scene holds too, at another size, angle and place).
Checkpoints and defaults are chosen on val; figures are reported on test. Building is deterministic
and cached as .npz under $WORKBENCH_DATA/scenes (default ~/.cache/workbench/scenes): x_train (N, 64,
64, 3) uint8, m_train (N, 64, 64) uint8, x_val, m_val, x_test, m_test. A cache written before val
existed is completed (its val scenes rendered and added) on first use, never served without val.
Smaller sets (for tests) come from `build_domain(..., n_train=, n_test=, n_val=)` or
WORKBENCH_SCENES_N="<train>,<test>[,<val>]" (val defaults to the test count); they are prefixes of
the full sets and are cached under their own file names. `builtin:scenes/<domain>[:train|val|test|all]`
names a domain wherever segmentation data is accepted (`all`: train, val and test in that order).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .. import common, digits

DOMAINS = ("printed", "textured")
NUM_CLASSES = 11
CLASS_NAMES = ("background",) + tuple(f"digit {d}" for d in range(10))
IGNORE_INDEX = 255
SIZE = 64
# 3: a digit's label is its region (ink grown by 2 pixels, holes filled), not its 2-4 pixel strokes
# 2: printed scenes draw paper and ink colours of either polarity (v1: dark ink on light paper)
VERSION = 3
TRAIN_SCENES, TEST_SCENES = 3000, 500   # val: as many as test
DIGITS_PER_SCENE = (3, 5)        # inclusive
GLYPH_HEIGHT = (16, 26)          # pixels, after rotation
MAX_WIDTH = 0.9                  # of the height
MAX_ROTATION = 10.0              # degrees
GAP = 2                          # pixels between digit boxes
HANDWRITTEN_FRACTION = 0.3
INK = 0.5                        # ink coverage from which a pixel is ink
REGION_RADIUS = 2                # pixels: a digit's region is its ink grown by this much
RENDER_SIZE = 96                 # points: glyphs are drawn large, then area-averaged down
SEEDS = {"printed": 21, "textured": 22}
SPLIT_STREAM = {"train": 0, "test": 1, "val": 2}   # val added after train / test: they kept their streams
SPLITS = ("train", "val", "test")


def cache_dir() -> Path:
    return common.cache_dir("scenes")


def check_domain(domain: str) -> str:
    return common.check_domain(domain, DOMAINS, "scenes")


# ------------------------------------------------------------------ digit shapes (shared by the domains)
@functools.lru_cache(maxsize=None)
def _fonts() -> tuple[Path, ...]:
    return tuple(digits.digit_fonts())


@functools.lru_cache(maxsize=None)
def _printed_alpha(font: Path, digit: int, stroke: int) -> np.ndarray:
    """Ink of one printed digit at RENDER_SIZE points, tightly cropped, float32 coverage 0..1."""
    face = ImageFont.truetype(str(font), RENDER_SIZE)
    canvas = Image.new("L", (2 * RENDER_SIZE, 2 * RENDER_SIZE), 0)
    ImageDraw.Draw(canvas).text((RENDER_SIZE, RENDER_SIZE), str(digit), fill=255, font=face, anchor="mm",
                                stroke_width=3 * stroke, stroke_fill=255)
    return np.asarray(canvas.crop(canvas.getbbox()), np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def _handwritten() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """UCI digits as smooth 64 x 64 ink coverage (grey level 4..12 -> 0..1), labels, and the fixed
    train / test indices of `adaptation.digits` (its 20% stratified split, same seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    big = np.stack([np.asarray(Image.fromarray(g.astype(np.float32)).resize((64, 64), Image.BICUBIC))
                    for g in data.images])
    alpha = np.clip((big - 4.0) / 8.0, 0.0, 1.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    train, test = digits.stratified_split(labels, digits.TEST_FRACTION, np.random.default_rng(digits.SEEDS["uci"]))
    return alpha, labels, train, test


def _crop_to_ink(alpha: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(alpha.max(1) > 0.01), np.flatnonzero(alpha.max(0) > 0.01)
    return alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _fit(alpha: np.ndarray, height: int, angle: float) -> np.ndarray:
    """Rotate the large ink map, crop it to its ink, area-average it down to `height` rows: coverage."""
    turned = Image.fromarray(np.ascontiguousarray(alpha, np.float32)).rotate(angle, resample=Image.BILINEAR, expand=True)
    turned = _crop_to_ink(np.asarray(turned))
    width = int(round(min(height * turned.shape[1] / turned.shape[0], MAX_WIDTH * height)))
    small = Image.fromarray(np.ascontiguousarray(turned, np.float32)).resize((max(width, 2), height), Image.BOX)
    return np.clip(np.asarray(small), 0.0, 1.0)


def _sample_digit(rng: np.random.Generator, split: str) -> tuple[int, np.ndarray]:
    """(digit 0..9, coverage map) of one digit instance."""
    height = int(rng.integers(GLYPH_HEIGHT[0], GLYPH_HEIGHT[1] + 1))
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    if rng.random() < HANDWRITTEN_FRACTION:
        alpha, labels, train, test = _handwritten()
        index = int(rng.choice(test if split == "test" else train))  # val shares the train glyphs
        return int(labels[index]), _fit(alpha[index], height, angle)
    digit = int(rng.integers(10))
    fonts = _fonts()
    glyph = _printed_alpha(fonts[int(rng.integers(len(fonts)))], digit, int(rng.integers(0, 3)))
    return digit, _fit(glyph, height, angle)


def _layout(rng: np.random.Generator, split: str) -> list[tuple[int, int, int, np.ndarray]]:
    """3-5 digits at non-overlapping places: [(digit, top, left, coverage)]; a digit that finds no free
    place in 50 draws is left out."""
    placed, boxes = [], []
    for _ in range(int(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1))):
        digit, cover = _sample_digit(rng, split)
        h, w = cover.shape
        for _ in range(50):
            top, left = int(rng.integers(1, SIZE - h)), int(rng.integers(1, SIZE - w))
            if all(top + h + GAP <= t or t + bh + GAP <= top or left + w + GAP <= l or l + bw + GAP <= left
                   for t, l, bh, bw in boxes):
                boxes.append((top, left, h, w))
                placed.append((digit, top, left, cover))
                break
    return placed


def label_map(placed) -> np.ndarray:
    """The (SIZE, SIZE) uint8 labels of a layout: each digit's region (its ink, coverage >= INK, grown by
    REGION_RADIUS pixels, holes filled) takes digit + 1; a one-pixel rim around a region, and any pixel two
    digits' regions both claim, is IGNORE; the rest is background 0."""
    from scipy import ndimage

    label = np.zeros((SIZE, SIZE), np.uint8)
    claimed = np.zeros((SIZE, SIZE), np.int64)       # how many regions cover a pixel
    rim = np.zeros((SIZE, SIZE), bool)
    for digit, top, left, cover in placed:
        ink = np.zeros((SIZE, SIZE), bool)
        ink[top:top + cover.shape[0], left:left + cover.shape[1]] = cover >= INK
        distance = ndimage.distance_transform_edt(~ink)
        region = ndimage.binary_fill_holes(distance <= REGION_RADIUS)
        rim |= (distance <= REGION_RADIUS + 1) & ~region
        claimed += region
        label[region] = digit + 1
    label[rim & (claimed == 0)] = IGNORE_INDEX
    label[claimed > 1] = IGNORE_INDEX
    return label


def _paint(image: np.ndarray, placed, colours) -> np.ndarray:
    """Blend each digit's ink colour over the image with its coverage as alpha (float image)."""
    for (digit, top, left, cover), colour in zip(placed, colours):
        region = image[top:top + cover.shape[0], left:left + cover.shape[1]]
        region[:] = region * (1.0 - cover[..., None]) + np.asarray(colour, np.float64) * cover[..., None]
    return image


# ------------------------------------------------------------------ appearances
def paint_printed(rng: np.random.Generator, placed) -> np.ndarray:
    """One ink colour on one plain paper colour per scene, either polarity: two random colours whose
    lumas differ by more than 80 (as the built-in `fonts` digits draw them). Nothing else in the scene."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        ink, paper = rng.integers(0, 256, 3).astype(np.float64), rng.integers(0, 256, 3).astype(np.float64)
        if abs(float((ink - paper) @ luma)) > 80:
            break
    image = np.broadcast_to(np.asarray(paper, np.float64), (SIZE, SIZE, 3)).copy()
    return np.round(_paint(image, placed, [ink] * len(placed))).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _backgrounds() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The photos and grey textures as arrays (the scenes crop them with numpy)."""
    return (tuple(map(np.asarray, common.skimage_images(common.BACKGROUND_PHOTOS, "RGB"))),
            tuple(map(np.asarray, common.skimage_images(common.BACKGROUND_TEXTURES, "L"))))


def _textured_background(rng: np.random.Generator) -> np.ndarray:
    """A random crop (48-160 pixels, so the zoom varies) of a photo, or of a grey texture tinted with a
    random colour, resized to the canvas, maybe mirrored, its channels maybe shuffled."""
    photos, textures = _backgrounds()
    use_texture = rng.random() < 0.3
    source = textures[int(rng.integers(len(textures)))] if use_texture else photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(48, 161))
    top, left = int(rng.integers(source.shape[0] - side)), int(rng.integers(source.shape[1] - side))
    crop = Image.fromarray(source[top:top + side, left:left + side]).resize((SIZE, SIZE), Image.BILINEAR)
    crop = np.asarray(crop, np.float64)
    if use_texture:
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        crop = low + (high - low) * (crop[..., None] / 255.0)
    elif rng.random() < 0.5:
        crop = crop[..., rng.permutation(3)]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def _clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """1-3 background strokes: straight lines and elliptic arcs, 1-3 pixels wide, random colours."""
    canvas = Image.fromarray(np.round(np.clip(image, 0, 255)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            draw.line([tuple(rng.uniform(0, SIZE, 2)), tuple(rng.uniform(0, SIZE, 2))], fill=colour, width=width)
        else:
            x0, y0 = rng.uniform(-SIZE / 4, SIZE * 0.75, 2)
            w, h = rng.uniform(10, SIZE * 0.75, 2)
            start = float(rng.uniform(0, 360))
            draw.arc([x0, y0, x0 + w, y0 + h], start, start + float(rng.uniform(60, 270)), fill=colour, width=width)
    return np.asarray(canvas, np.float64)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour whose luma differs by more than 70 from the mean colour under the digit:
    lighter or darker, whichever the draw gives (both polarities occur)."""
    target = common.luma(under.reshape(-1, 3).mean(0))
    for _ in range(30):
        colour = rng.uniform(0, 256, 3)
        if abs(common.luma(colour) - target) > 70:
            return colour
    return np.full(3, 0.0 if target > 127 else 255.0)


def paint_textured(rng: np.random.Generator, placed) -> np.ndarray:
    """Photo or texture background, clutter strokes, digits in contrasting colours of either
    polarity, then blur (half of the scenes, radius up to 0.8) and Gaussian noise (sigma up to 8)."""
    image = _clutter(rng, _textured_background(rng))
    colours = [_contrasting_colour(rng, image[t:t + c.shape[0], l:l + c.shape[1]]) for _, t, l, c in placed]
    image = np.round(np.clip(_paint(image, placed, colours), 0, 255)).astype(np.uint8)
    if rng.random() < 0.5:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8)))))
    noise = rng.normal(0.0, rng.uniform(0, 8), image.shape)
    return np.round(np.clip(image + noise, 0, 255)).astype(np.uint8)


PAINTERS = {"printed": paint_printed, "textured": paint_textured}


def render_scene(domain: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of a domain's split: (image (SIZE, SIZE, 3) uint8, labels (SIZE, SIZE) uint8).

    Each scene has its own random stream (domain seed, split, index), so a scene never depends on
    how many were built before it."""
    rng = np.random.default_rng([SEEDS[check_domain(domain)], SPLIT_STREAM[split], index])
    placed = _layout(rng, split)
    return PAINTERS[domain](rng, placed), label_map(placed)


# ------------------------------------------------------------------ cache
COUNTS_VARIABLE = "WORKBENCH_SCENES_N"
ARRAY_KEYS = tuple(f"{kind}_{split}" for split in SPLITS for kind in ("x", "m"))


def scene_counts(n_train: int | None = None, n_test: int | None = None,
                 n_val: int | None = None) -> tuple[int, int, int]:
    """(train, val, test) set sizes: arguments, else WORKBENCH_SCENES_N="<train>,<test>[,<val>]", else
    3000 / 500 / 500; val defaults to the test count."""
    return common.split_counts(COUNTS_VARIABLE, (TRAIN_SCENES, TEST_SCENES), "scene", n_train, n_test, n_val)


def cache_path(domain: str, n_train: int | None = None, n_test: int | None = None, n_val: int | None = None) -> Path:
    suffix = common.counts_suffix(scene_counts(n_train, n_test, n_val), (TRAIN_SCENES, TEST_SCENES))
    return cache_dir() / f"{check_domain(domain)}-v{VERSION}{suffix}.npz"


def _complete(path: Path) -> bool:
    """Whether a cache file holds every split (the counts are in its name)."""
    try:
        with np.load(path) as data:
            return set(ARRAY_KEYS) <= set(data.files)
    except (OSError, ValueError):
        return False


def build_domain(domain: str, force: bool = False, n_train: int | None = None, n_test: int | None = None,
                 n_val: int | None = None) -> Path:
    """Build (or reuse) the cached scenes of one domain; returns the .npz path. A cache without a split
    (val, in caches written before val existed) gets that split rendered and added; the others are kept."""
    path = cache_path(domain, n_train, n_test, n_val)
    counts = dict(zip(SPLITS, scene_counts(n_train, n_test, n_val)))
    if path.exists() and not force and _complete(path):
        return path
    arrays = {}
    if path.exists() and not force:
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError):
            arrays = {}
    for split, count in counts.items():
        if f"x_{split}" in arrays and f"m_{split}" in arrays and len(arrays[f"m_{split}"]) == count:
            continue
        scenes = [render_scene(domain, split, i) for i in range(count)]
        arrays[f"x_{split}"] = np.stack([s[0] for s in scenes])
        arrays[f"m_{split}"] = np.stack([s[1] for s in scenes])
    arrays = {key: arrays[key] for key in ARRAY_KEYS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_domain(domain: str, n_train: int | None = None, n_test: int | None = None,
                n_val: int | None = None) -> dict[str, np.ndarray]:
    """{x_train, m_train, x_val, m_val, x_test, m_test} of one domain, building the cache if needed."""
    with np.load(build_domain(domain, n_train=n_train, n_test=n_test, n_val=n_val)) as data:
        return {key: data[key] for key in ARRAY_KEYS}


def load_split(domain: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 64, 64, 3) uint8, masks (N, 64, 64) uint8) of `train`, `val`, `test` or `all` (the three
    in that order)."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}: use train, val, test or all")
    arrays = load_domain(domain)
    if split == "all":
        return (np.concatenate([arrays[f"x_{s}"] for s in SPLITS]),
                np.concatenate([arrays[f"m_{s}"] for s in SPLITS]))
    return arrays[f"x_{split}"], arrays[f"m_{split}"]
