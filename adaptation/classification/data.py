"""Image data for adaptation: list files, one-folder-per-class trees and the built-in digits.

A data argument is one of
    builtin:digits/<domain>[:train|test|all]   the built-in digits (adaptation.digits)
    path/to/list.txt                            one `<image path> <int label>` per line
    path/to/root/                               one sub-folder per class (sorted names = labels)

Every problem with user data is a `DataError` whose one-line message names the file,
the line and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .. import digits
from ..common import DIGITS_MEAN, DIGITS_STD, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, read_image

@dataclass
class Sample:
    path: str
    label: int
    line: int | None = None  # its line in the list file it came from, for error messages


# ------------------------------------------------------------------ sources
def read_list_file(list_file: str | Path, root: str | Path | None = None) -> list[Sample]:
    """Parse `<path> <int label>` lines; relative paths resolve against `root` or the list's folder."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"list file {list_file} does not exist: pass a text file of '<path> <label>' lines")
    base = Path(root) if root is not None else list_file.parent
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.rstrip().rpartition(" ")
        try:
            label_value = int(label)
        except ValueError:
            raise DataError(f"{list_file}:{number}: expected '<path> <int label>', got {line.strip()!r}") from None
        if not path.strip():
            raise DataError(f"{list_file}:{number}: expected '<path> <int label>', got {line.strip()!r}")
        image = Path(path.strip())
        samples.append(Sample(str(image if image.is_absolute() else base / image), label_value, number))
    if not samples:
        raise DataError(f"list file {list_file} holds no samples: add '<path> <label>' lines")
    missing = [(i, s.path) for i, s in enumerate(samples) if not Path(s.path).is_file()]
    if missing:
        i, path = missing[0]
        raise DataError(f"{list_file}: image {path} listed in sample {i + 1} does not exist "
                        f"({len(missing)} missing in all): fix the paths or pass --root")
    return samples


def scan_class_folders(root: str | Path) -> tuple[list[Sample], list[str]]:
    """One sub-folder per class; labels follow the sorted folder names (as torchvision's ImageFolder)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expect {root}/<class name>/<image files>")
    samples = [Sample(str(f), label) for label, name in enumerate(classes)
               for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"{root} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return samples, classes


def check_labels(dataset: Dataset, num_classes: int, source: str) -> None:
    """Every label must lie in 0..num_classes-1; name the first offending list-file line, or the class folders."""
    labels = dataset.labels
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if not len(bad):
        return
    index, label = int(bad[0]), int(labels[bad[0]])
    valid = f"0..{num_classes - 1} for a {num_classes}-class model"
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        raise DataError(f"{source} has {len(classes)} class folders: folder {classes[label]!r} gets label {label}, "
                        f"outside {valid}; pass a folder with the model's classes")
    samples = getattr(dataset, "samples", None)
    line = samples[index].line if samples is not None else None
    if line is None:  # built-in data: no file to fix
        raise DataError(f"{source} sample {index + 1}: label {label} is outside {valid}: pass data with its classes")
    raise DataError(f"{source} line {line}: label {label} is outside {valid}: "
                    f"fix the label or pass the right list file")


# ------------------------------------------------------------------ datasets
class ImageFileDataset(Dataset):
    """Images read from disk with PIL; returns (image tensor, label, index)."""

    def __init__(self, samples: list[Sample], transform: Callable, source: str):
        self.samples, self.transform, self.source = samples, transform, source
        self.labels = np.array([s.label for s in samples], np.int64)
        self.paths = [s.path for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        return read_image(self.samples[index].path, self.source)

    def __getitem__(self, index: int):
        return self.transform(self.load_image(index)), int(self.labels[index]), index


def is_deterministic(transform: Callable) -> bool:
    """True for a torchvision Compose without random steps (its output can be computed once)."""
    steps = getattr(transform, "transforms", None)
    return steps is not None and not any(type(t).__name__.startswith("Random") for t in steps)


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (N, H, W, 3), e.g. a built-in digits domain.

    With a deterministic transform the transformed tensors are computed once up front:
    small images spend more time in per-sample PIL conversion than in the network."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, source: str):
        self.images, self.labels, self.transform, self.source = images, labels.astype(np.int64), transform, source
        self.paths = [f"{source}#{i}" for i in range(len(images))]
        self.tensors = (torch.stack([transform(self.load_image(i)) for i in range(len(images))])
                        if is_deterministic(transform) else None)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def __getitem__(self, index: int):
        image = self.tensors[index] if self.tensors is not None else self.transform(self.load_image(index))
        return image, int(self.labels[index]), index


# ------------------------------------------------------------------ transforms
def image_transform(style: str, train: bool, image_size: int | None = None) -> Callable:
    """The standard transforms: `imagenet` (resize 256, crop 224, flip; ImageNet statistics) or
    `digits` (32x32, mean/std 0.5)."""
    if style == "imagenet":
        image_size = image_size or 224
        resize = int(round(image_size * 256 / 224))
        augment = [T.RandomCrop(image_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(image_size)]
        return T.Compose([T.Resize((resize, resize)), *augment, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if style == "digits":
        image_size = image_size or digits.SIZE
        return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(DIGITS_MEAN, DIGITS_STD)])
    raise ValueError(f"unknown transform style {style!r}: use imagenet or digits")


# ------------------------------------------------------------------ one entry point
def parse_builtin(spec: str) -> tuple[str, str]:
    """`builtin:digits/<domain>[:split]` -> (domain, split)."""
    body = spec[len("builtin:"):]
    family, _, rest = body.partition("/")
    if family != "digits" or not rest:
        raise DataError(f"unknown built-in data {spec!r}: use builtin:digits/<domain> with domain in "
                        f"{', '.join(digits.DOMAINS)}")
    domain, _, split = rest.partition(":")
    split = split or digits.DEFAULT_SPLIT
    if split not in digits.SPLITS:
        raise DataError(f"unknown split {split!r} in {spec!r}: use one of {', '.join(digits.SPLITS)} "
                        f"(none: {digits.DEFAULT_SPLIT})")
    return digits.check_domain(domain), split


def load_dataset(spec: str, transform: Callable, num_classes: int | None = None, root: str | None = None):
    """Build a dataset from a data argument; checks labels against `num_classes` when given."""
    if spec.startswith("builtin:"):
        domain, split = parse_builtin(spec)
        images, labels = digits.load_domain(domain, split)
        dataset = ArrayImageDataset(images, labels, transform, spec)
        found_classes = digits.NUM_CLASSES
    else:
        path = Path(spec)
        if path.is_dir():
            samples, classes = scan_class_folders(path)
            found_classes = len(classes)
        elif path.is_file():
            samples = read_list_file(path, root)
            found_classes = max(s.label for s in samples) + 1
        else:
            raise DataError(f"data {spec!r} is neither a list file, a folder of class folders, nor "
                            f"builtin:digits/<domain>")
        dataset = ImageFileDataset(samples, transform, spec)
        if path.is_dir():
            dataset.classes = classes
    if num_classes is not None:
        check_labels(dataset, num_classes, spec)
    dataset.num_classes = num_classes or found_classes
    return dataset


def class_subset(dataset, classes, unknown: bool = False, keep_classes=None):
    """The samples of `dataset` whose label is one of `classes` (or of `keep_classes`, a subset of them),
    relabelled by the label's position in `classes` (the model's output index); with `unknown`, every other
    sample as well, labelled len(classes) (the open-set "unknown" class). Returns a data set of the same kind."""
    index = {int(c): i for i, c in enumerate(classes)}
    new_labels = np.array([index.get(int(label), len(classes)) for label in dataset.labels], np.int64)
    wanted = set(int(c) for c in (classes if keep_classes is None else keep_classes))
    keep = np.array([unknown or int(label) in wanted for label in dataset.labels], bool)
    if not keep.any():
        raise DataError(f"{dataset.source} holds no sample of classes {sorted(wanted)}: pass data with them")
    if isinstance(dataset, ArrayImageDataset):
        subset = ArrayImageDataset(dataset.images[keep], new_labels[keep], dataset.transform, dataset.source)
    else:
        subset = ImageFileDataset([Sample(s.path, int(label), s.line) for s, label, k in
                                   zip(dataset.samples, new_labels, keep) if k], dataset.transform, dataset.source)
    subset.num_classes = len(classes) + int(unknown)
    return subset


def default_style(spec: str) -> str:
    return "digits" if spec.startswith("builtin:digits") else "imagenet"


def builtin_test_split(spec: str) -> str | None:
    """`builtin:digits/<d>[:train|:trainval]` -> `builtin:digits/<d>:test` (adaptation runs on the unlabelled
    training data and reports the test split); None for any other data."""
    if not spec.startswith("builtin:"):
        return None
    domain, split = parse_builtin(spec)
    return f"builtin:digits/{domain}:test" if split in ("train", "trainval") else None


def load_target(spec: str, model_config: dict, train: bool = False, setting: str = "closed",
                target_classes=None):
    """A data set transformed as the model expects. Closed set: its class count must match the model's.
    Partial set: the samples of `target_classes` (label values, all among the model's classes), labelled by
    the model's output index. Open set: every sample, the classes the model lacks labelled "unknown" (index =
    the model's class count). The model's classes are the data labels its checkpoint names (`classes`, for
    a source trained on some labels only), else 0..num_classes-1."""
    transform = image_transform(model_config["transform"], train, model_config.get("image_size"))
    if setting == "closed":
        return load_dataset(spec, transform, num_classes=model_config["num_classes"])  # a bad label names its line
    dataset = load_dataset(spec, transform)
    classes = model_config.get("classes") or list(range(model_config["num_classes"]))
    if setting == "partial":
        missing = sorted(set(int(c) for c in target_classes) - set(classes))
        if missing:
            raise DataError(f"--target-classes {','.join(map(str, missing))}: not among the source model's classes "
                            f"{','.join(map(str, classes))}: a partial-set target holds a subset of them")
        return class_subset(dataset, classes, keep_classes=target_classes)
    if set(int(c) for c in np.unique(dataset.labels)) <= set(classes):
        raise DataError(f"{spec} holds no class outside the source model's classes {','.join(map(str, classes))}: "
                        f"open-set adaptation needs a source trained on the known classes only "
                        f"(train-source --classes), or a target with unknown classes")
    return class_subset(dataset, classes, unknown=True)
