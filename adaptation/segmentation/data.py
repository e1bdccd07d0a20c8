"""Image + label-map data for segmentation, and the joint transforms that keep the two aligned.

A segmentation data argument is one of
    builtin:scenes/<domain>[:train|val|test|all]   the built-in digit scenes (adaptation.segmentation.scenes):
                                                train by default; val chooses checkpoints and settings,
                                                test is what is reported
    path/to/root/                               root/images/<name>.<ext> with root/masks/<name>.png
                                                (same relative path and stem; sub-folders allowed)
    path/to/list.txt                            one `<image path> <mask path>` per line; relative
                                                paths resolve against the list's folder; blank
                                                lines and lines starting with # are skipped

A mask is a single-channel label map (an 'L' or 'P' PNG, as PASCAL VOC ships them): pixel value =
class index, 255 = ignore. Every image and mask is checked when the set is loaded (the masks are
read once): a missing mask, an image/mask size mismatch, a label that is neither a class nor 255,
an empty set, a malformed list line and a missing file each raise a `DataError` whose one-line
message names the file (or list line) and the fix. `num_classes` (a checkpoint's class count)
makes any larger label an error; None infers it as the largest label + 1.

Transforms (torchvision.transforms.v2 on tv_tensors.Image / Mask, so geometry applies to both and
masks are resampled with nearest neighbour): training draws a scale factor in [0.5, 2.0] (as the
segmentation papers' "resize 0.5-2.0"), crops `crop_size` x `crop_size` at a random place (padding
the image with 0 and the mask with 255 where the scaled image is smaller) and flips horizontally
with probability 0.5; evaluation changes no geometry. Both normalise with the ImageNet mean / std.
Items are (image float (3, H, W), mask int64 (H, W), index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..common import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, read_image
from . import scenes

__all__ = ["IGNORE_INDEX", "DataError", "SegmentationDataset", "load_segmentation", "builtin_scenes_test_split",
           "builtin_scenes_val_split", "parse_builtin_scenes", "segmentation_transform", "RandomScale", "DEFAULT_CROP"]

IGNORE_INDEX = 255
SCALE_RANGE = (0.5, 2.0)
DEFAULT_CROP = 512                        # training crop for user data; the scenes use their canvas size
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")  # lossless: no JPEG label maps


# ------------------------------------------------------------------ transforms
class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from `scale_range` (bilinear for the
    image, nearest for the mask: tv_tensors.Mask is always resampled with nearest neighbour)."""

    def __init__(self, scale_range: tuple[float, float] = SCALE_RANGE):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        scale = float(torch.empty(()).uniform_(*self.scale_range))  # torch's generator, seeded per worker
        return {"size": [max(1, int(round(height * scale))), max(1, int(round(width * scale)))]}

    def transform(self, inpt, params):
        return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def segmentation_transform(train: bool, crop_size: int | None = None) -> v2.Compose:
    """The joint transform of (tv_tensors.Image uint8, tv_tensors.Mask uint8) pairs; see the module doc."""
    geometry = []
    if train:
        crop = crop_size or DEFAULT_CROP
        geometry = [RandomScale(SCALE_RANGE),
                    v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
                    v2.RandomHorizontalFlip()]
    return v2.Compose([*geometry, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------ sources
@dataclass
class Pair:
    image: str
    mask: str
    origin: str  # where it came from, for messages: "list.txt line 3" or "root/images/a.jpg"


def _check_exists(pair: Pair) -> None:
    for kind, path in (("image", pair.image), ("mask", pair.mask)):
        if not Path(path).is_file():
            raise DataError(f"{pair.origin}: {kind} {path} does not exist: fix the path or restore the file")


def read_pair_list(list_file: Path) -> list[Pair]:
    """`<image> <mask>` lines; relative paths resolve against the list's folder."""
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{list_file} line {number}: expected '<image path> <mask path>', got {line.strip()!r}")
        image, mask = (Path(f) if Path(f).is_absolute() else list_file.parent / f for f in fields)
        pair = Pair(str(image), str(mask), f"{list_file} line {number}")
        _check_exists(pair)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"list file {list_file} holds no pairs: add '<image path> <mask path>' lines")
    return pairs


def scan_pair_folder(root: Path) -> list[Pair]:
    """root/images/**/<stem>.<image ext> paired with root/masks/**/<stem>.png (or another lossless format)."""
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{root} has no {folder.name}/ folder: a segmentation folder holds images/ and masks/ "
                            f"with the same file stems")
    images = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{images_dir} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}): add images "
                        f"and their masks")
    pairs = []
    for image in images:
        stem = masks_dir / image.relative_to(images_dir).with_suffix("")
        mask = next((stem.with_suffix(ext) for ext in MASK_EXTENSIONS if stem.with_suffix(ext).is_file()), None)
        if mask is None:
            raise DataError(f"image {image} has no mask {stem.with_suffix('.png')}: add the label map or remove "
                            f"the image")
        pairs.append(Pair(str(image), str(mask), str(image)))
    return pairs


def _open_mask(path: str, origin: str) -> np.ndarray:
    """A label map as uint8 (H, W); values above 255 are an error."""
    def label_map(img: Image.Image) -> np.ndarray:
        if img.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            raise DataError(f"{origin}: mask {path} is a {img.mode} image: a label map is single-channel "
                            f"('L' or palette 'P' PNG) with class indices as pixel values")
        return np.asarray(img)

    mask = read_image(path, origin, label_map, what="mask")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            bad = int(mask.max() if mask.max() > 255 else mask.min())
            raise DataError(f"{origin}: mask {path} holds label {bad}, neither a class nor {IGNORE_INDEX} (ignore): "
                            f"fix the mask")
        mask = mask.astype(np.uint8)
    return mask


def _image_size(path: str, origin: str) -> tuple[int, int]:
    """(height, width) from the header, without decoding."""
    return read_image(path, origin, lambda img: (img.height, img.width))


def _check_label_values(mask: np.ndarray, num_classes: int | None, where: str) -> int:
    """The mask's largest class label (-1 if none); with `num_classes`, any label outside it and not 255 is
    an error naming `where` and the value."""
    values = np.unique(mask)
    labels = values[values != IGNORE_INDEX]
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        bad = int(labels[labels >= num_classes][0])
        raise DataError(f"{where} holds label {bad}, outside 0..{num_classes - 1} for {num_classes} classes and "
                        f"not {IGNORE_INDEX} (ignore): fix the mask or pass data with the model's classes")
    return int(labels.max()) if len(labels) else -1


# ------------------------------------------------------------------ the dataset
class SegmentationDataset(Dataset):
    """Image / label-map pairs, from files or from in-memory arrays (the built-in scenes).

    Items: (image float32 (3, H, W) normalised, mask int64 (H, W) with 255 = ignore, index).
    Attributes: num_classes, class_names, paths (image paths, or `<spec>#<i>` for built-in data),
    names (unique output stems, e.g. for saved prediction PNGs), source (the data argument).
    `raw(i)` gives the untransformed (PIL RGB image, uint8 (H, W) mask) for panels and saved files."""

    def __init__(self, source: str, transform, num_classes: int, *, pairs: list[Pair] | None = None,
                 images: np.ndarray | None = None, masks: np.ndarray | None = None,
                 class_names: list[str] | None = None):
        self.source, self.transform, self.num_classes = source, transform, num_classes
        self.pairs, self.images, self.masks = pairs, images, masks
        self.ignore_index = IGNORE_INDEX
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        if pairs is not None:
            self.paths = [p.image for p in pairs]
            stems = [Path(p.image).stem for p in pairs]
            self.names = stems if len(set(stems)) == len(stems) else [f"{i:05d}_{s}" for i, s in enumerate(stems)]
        else:
            self.paths = [f"{source}#{i}" for i in range(len(images))]
            self.names = [f"{i:05d}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.images)

    def raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if self.pairs is None:
            return Image.fromarray(self.images[index]), self.masks[index]
        pair = self.pairs[index]
        image, mask = read_image(pair.image, pair.origin), _open_mask(pair.mask, pair.origin)
        if (image.height, image.width) != mask.shape:
            raise DataError(f"{pair.origin}: image {pair.image} is {image.width}x{image.height} but mask {pair.mask} "
                            f"is {mask.shape[1]}x{mask.shape[0]}: give them the same size")
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.raw(index)
        image = tv_tensors.Image(F.pil_to_tensor(image))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(mask, np.uint8)))  # a writable copy
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long(), index


# ------------------------------------------------------------------ one entry point
SCENE_SPLITS = ("train", "val", "test", "all")


def parse_builtin_scenes(spec: str) -> tuple[str, str]:
    """`builtin:scenes/<domain>[:train|val|test|all]` -> (domain, split)."""
    family, _, rest = spec[len("builtin:"):].partition("/")
    domain, _, split = rest.partition(":")
    if family != "scenes" or not domain:
        raise DataError(f"unknown built-in segmentation data {spec!r}: use builtin:scenes/<domain>[:train|val|test|all] "
                        f"with domain in {', '.join(scenes.DOMAINS)}")
    if domain not in scenes.DOMAINS:
        raise DataError(f"unknown built-in scenes domain {domain!r} in {spec!r}: choose one of "
                        f"{', '.join(scenes.DOMAINS)}")
    split = split or "train"
    if split not in SCENE_SPLITS:
        raise DataError(f"unknown split {split!r} in {spec!r}: use train, val, test or all")
    return domain, split


def _builtin_scenes_split(spec: str, split: str) -> str | None:
    if not spec.startswith("builtin:scenes/"):
        return None
    domain, given = parse_builtin_scenes(spec)
    return f"builtin:scenes/{domain}:{split}" if given == "train" else None


def builtin_scenes_test_split(spec: str) -> str | None:
    """`builtin:scenes/<d>[:train]` -> `builtin:scenes/<d>:test` (train or adapt on the train split, report
    the test split); None for any other data."""
    return _builtin_scenes_split(spec, "test")


def builtin_scenes_val_split(spec: str) -> str | None:
    """`builtin:scenes/<d>[:train]` -> `builtin:scenes/<d>:val` (train or adapt on the train split, choose
    checkpoints and settings on the val split); None for any other data."""
    return _builtin_scenes_split(spec, "val")


def _check_pairs(pairs: list[Pair], num_classes: int | None) -> int:
    """Read every mask once: sizes against the image headers and label values. Returns the largest label."""
    largest = -1
    for pair in pairs:
        mask = _open_mask(pair.mask, pair.origin)
        height, width = _image_size(pair.image, pair.origin)
        if (height, width) != mask.shape:
            raise DataError(f"{pair.origin}: image {pair.image} is {width}x{height} but mask {pair.mask} is "
                            f"{mask.shape[1]}x{mask.shape[0]}: give them the same size")
        largest = max(largest, _check_label_values(mask, num_classes, f"{pair.origin}: mask {pair.mask}"))
    return largest


def load_segmentation(spec: str, num_classes: int | None = None, train: bool = False,
                      crop_size: int | None = None) -> SegmentationDataset:
    """A segmentation data set from a data argument (see the module doc).

    `num_classes`: the model's class count (labels must lie below it or be 255); None infers it from the
    data (the scenes' 11, else the largest label + 1). `train`: random scale / crop / flip, with crops of
    `crop_size` (default: the scenes' canvas, 64, or DEFAULT_CROP = 512 for user data)."""
    if spec.startswith("builtin:"):
        domain, split = parse_builtin_scenes(spec)
        if num_classes is not None and num_classes != scenes.NUM_CLASSES:
            raise DataError(f"{spec} has {scenes.NUM_CLASSES} classes (background + 10 digits) but the model has "
                            f"{num_classes}: pass a model trained on the scenes")
        images, masks = scenes.load_split(domain, split)
        transform = segmentation_transform(train, crop_size or scenes.SIZE)
        return SegmentationDataset(spec, transform, scenes.NUM_CLASSES, images=images, masks=masks,
                                   class_names=list(scenes.CLASS_NAMES))
    path = Path(spec)
    if path.is_dir():
        pairs = scan_pair_folder(path)
    elif path.is_file():
        pairs = read_pair_list(path)
    else:
        raise DataError(f"segmentation data {spec!r} does not exist: pass a folder with images/ and masks/, a list "
                        f"file of '<image> <mask>' lines, or builtin:scenes/<domain>")
    largest = _check_pairs(pairs, num_classes)
    if num_classes is None:
        if largest < 0:
            raise DataError(f"{spec}: every mask pixel is {IGNORE_INDEX} (ignore): no class to learn; pass "
                            f"--num-classes or fix the masks")
        num_classes = largest + 1
    return SegmentationDataset(spec, segmentation_transform(train, crop_size), num_classes, pairs=pairs)
