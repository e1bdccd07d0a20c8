"""A built-in digits benchmark made only from real data that Python packages ship.

Three domains of 32x32 RGB digits (10 classes), each with a fixed split:

- `uci`:   scikit-learn's 1,797 handwritten digits (8x8, UCI), upsampled to 32x32 grey-as-RGB;
- `fonts`: digits printed with matplotlib's bundled TrueType faces, each glyph filling most of the
           frame as in house-number crops, under random face, colours (either polarity), offset,
           rotation, stroke and blur (a SynDigits-like printed domain);
- `photo`: the handwritten digits blended over random crops of scikit-image's photos by
           absolute difference, the MNIST-M recipe.

Building is deterministic (fixed seeds) and cached as .npz under $WORKBENCH_DATA
(default ~/.cache/workbench/digits). `builtin:digits/<domain>[:split]` names a domain anywhere
a data argument is accepted. Splits: `test` (a stratified 20%); `trainval`, the other 80% (the
published train split the SHOT digits protocol trains and adapts on, and the default when no split is
named); `val`, a fixed stratified 10% of trainval for choosing checkpoints and defaults; and `train`,
trainval without val. train, val and test are disjoint.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from . import common

DOMAINS = ("uci", "fonts", "photo")
NUM_CLASSES = 10
SIZE = 32
VERSION = 2  # 2: printed glyphs fill the frame (in v1 they covered about 60% of its height)
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1              # of trainval: held out for selection, never trained on when selected on
SPLITS = ("train", "val", "test", "trainval", "all")
DEFAULT_SPLIT = "trainval"
FONT_IMAGES_PER_CLASS = 600
GLYPH_RENDER_SIZE = 96          # points; glyphs are drawn large, then fitted to the frame
GLYPH_HEIGHT = (0.8, 0.98)      # fraction of the frame height the ink spans (house-number crops)
GLYPH_MAX_WIDTH = 0.8           # wide faces are squeezed to this fraction of the frame width
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "ihc.png", "retina.jpg")


def cache_dir() -> Path:
    return common.cache_dir("digits")


def check_domain(domain: str) -> str:
    return common.check_domain(domain, DOMAINS, "digits")


# ------------------------------------------------------------------ domains
def _uci_digits_32() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 32, 32) uint8 grey images and labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((SIZE, SIZE), Image.BICUBIC)) for g in grey])
    return big, digits.target.astype(np.int64)


def build_uci(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grey, labels = _uci_digits_32()
    return np.repeat(grey[..., None], 3, axis=-1), labels


def build_photo(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M recipe: |background crop - digit| per channel."""
    from PIL import Image
    import skimage

    photo_dir = Path(skimage.__file__).parent / "data"
    photos = [np.asarray(Image.open(photo_dir / name).convert("RGB")) for name in PHOTOS]
    grey, labels = _uci_digits_32()
    out = np.empty((len(grey), SIZE, SIZE, 3), np.uint8)
    for i, digit in enumerate(grey):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - SIZE)
        left = rng.integers(photo.shape[1] - SIZE)
        crop = photo[top:top + SIZE, left:left + SIZE].astype(np.int16)
        out[i] = np.abs(crop - digit[..., None].astype(np.int16)).astype(np.uint8)
    return out, labels


DIGIT_GLYPHS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_fonts() -> list[Path]:
    """matplotlib's bundled faces that map the characters 0-9 to digit glyphs.

    Symbol faces (cmex10, cmsy10, the STIX size variants, LastResort) put other glyphs at
    those code points, so the glyph names in each face's character map decide.
    """
    import matplotlib
    from matplotlib.ft2font import FT2Font

    usable = []
    for path in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf")):
        face = FT2Font(str(path))
        charmap = face.get_charmap()
        names = [face.get_glyph_name(charmap[ord(d)]) if ord(d) in charmap else "" for d in "0123456789"]
        if all(name.startswith(glyph) for name, glyph in zip(names, DIGIT_GLYPHS)):
            usable.append(path)
    return usable


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple, tuple]:
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        luma = np.array([0.299, 0.587, 0.114])
        if abs(float(fg @ luma - bg @ luma)) > 80:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


@functools.lru_cache(maxsize=None)
def _font(path: Path):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), GLYPH_RENDER_SIZE)


def _glyph_mask(font_path: Path, label: int, stroke: int, scale: int):
    """The ink of one digit as a tight 'L' mask, drawn large so that resizing it stays smooth."""
    from PIL import Image, ImageDraw

    size, font = GLYPH_RENDER_SIZE, _font(font_path)
    mask = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(mask).text((size, size), str(label), fill=255, font=font, anchor="mm",
                              stroke_width=stroke * size // (16 * scale), stroke_fill=255)
    return mask.crop(mask.getbbox())


def build_fonts(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Printed digits framed as house-number crops are: the glyph's ink fills most of the frame height
    (GLYPH_HEIGHT of it), centred up to a few pixels off. Face, colours (either polarity), stroke weight,
    rotation and blur vary per image."""
    from PIL import Image, ImageFilter

    fonts = digit_fonts()
    scale = 2  # compose at 64x64, then downsample: anti-aliased strokes
    side = SIZE * scale
    images, labels = [], []
    for label in range(NUM_CLASSES):
        for _ in range(FONT_IMAGES_PER_CLASS):
            fg, bg = _contrasting_colours(rng)
            glyph = _glyph_mask(fonts[rng.integers(len(fonts))], label, int(rng.integers(0, 3)), scale)
            height = rng.uniform(*GLYPH_HEIGHT) * side
            width = min(height * glyph.width / glyph.height, GLYPH_MAX_WIDTH * side)
            glyph = glyph.resize((max(1, int(round(width))), max(1, int(round(height)))), Image.LANCZOS)
            left = (side - glyph.width) // 2 + int(rng.integers(-2, 3)) * scale
            top = (side - glyph.height) // 2 + int(rng.integers(-2, 3)) * scale
            canvas = Image.new("RGB", (side, side), bg)
            canvas.paste(Image.new("RGB", glyph.size, fg), (left, top), glyph)
            canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=bg)
            canvas = canvas.resize((SIZE, SIZE), Image.LANCZOS)
            blur = float(rng.uniform(0, 1.0))
            if blur > 0.3:
                canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
            images.append(np.asarray(canvas))
            labels.append(label)
    return np.stack(images), np.array(labels, np.int64)


BUILDERS = {"uci": build_uci, "fonts": build_fonts, "photo": build_photo}
SEEDS = {"uci": 11, "fonts": 12, "photo": 13}


# ------------------------------------------------------------------ split, cache, load
def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Indices of a fixed per-class split: the same fraction of every class goes to test."""
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def cache_path(domain: str) -> Path:
    return cache_dir() / f"{check_domain(domain)}-v{VERSION}.npz"


def build_domain(domain: str, force: bool = False) -> Path:
    """Build (or reuse) the cached arrays of one domain; returns the .npz path."""
    path = cache_path(domain)
    if path.exists() and not force:
        return path
    rng = np.random.default_rng(SEEDS[domain])
    images, labels = BUILDERS[domain](rng)
    train, test = stratified_split(labels, TEST_FRACTION, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, x_train=images[train], y_train=labels[train], x_test=images[test],
                        y_test=labels[test])
    os.replace(tmp, path)
    return path


def val_indices(labels: np.ndarray, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into a domain's trainval arrays: a fixed stratified VAL_FRACTION goes to val."""
    return stratified_split(labels, VAL_FRACTION, np.random.default_rng([SEEDS[domain], 2]))


def load_domain(domain: str, split: str = DEFAULT_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one split, building the cache if needed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    with np.load(build_domain(domain)) as data:
        if split == "all":
            return (np.concatenate([data["x_train"], data["x_test"]]),
                    np.concatenate([data["y_train"], data["y_test"]]))
        if split == "test":
            return data["x_test"], data["y_test"]
        images, labels = data["x_train"], data["y_train"]  # the cache's train arrays are trainval
    if split == "trainval":
        return images, labels
    part = val_indices(labels, check_domain(domain))[split == "val"]
    return images[part], labels[part]


def split_contains(outer: str, inner: str) -> bool:
    """Whether every sample of split `inner` is also in split `outer` (of the same domain)."""
    return outer == inner or outer == "all" or (outer == "trainval" and inner in ("train", "val"))
