"""What every adaptation task shares: image constants, the error a user's input raises, the held-out
split that selects a source model where no selection data is given, and the plumbing of the built-in
domains (their cache folder, the check of a domain name, scikit-image's photos, luma)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from workbench.checkpoint import CheckpointError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_MEAN, DIGITS_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class DataError(ValueError):
    """A problem with user-supplied data (missing image, bad label, empty list ...)."""


def read_image(path, origin, read=lambda img: img.convert("RGB"), what: str = "image"):
    """`read(img)` of the image file at `path` (by default its RGB copy); a missing, unreadable or foreign file is
    a DataError naming `origin` (the list, folder or annotation file that named it), the file and the fix."""
    try:
        with Image.open(path) as img:
            return read(img)
    except FileNotFoundError:
        raise DataError(f"{origin}: {what} {path} does not exist: restore it or fix its path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{origin}: {what} {path} is corrupt or not an image ({exc.__class__.__name__}): replace it "
                        f"or remove it") from None


# Problems with what a user passed (data, checkpoints, settings): one line each, and under torchrun found before
# training starts and raised on every rank alike (Distributed.main_first).
INPUT_ERRORS = (ValueError, CheckpointError, FileNotFoundError)


# scikit-image's bundled photos and grey textures (tinted with a random colour): the backgrounds of the
# textured scenes and figures
BACKGROUND_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                     "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png")
BACKGROUND_TEXTURES = ("brick.png", "grass.png", "gravel.png")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B


def luma(rgb) -> float:
    return float(np.asarray(rgb, np.float64) @ LUMA)


def data_root() -> Path:
    """Where every built-in benchmark is cached: $WORKBENCH_DATA, default ~/.cache/workbench."""
    return Path(os.environ.get("WORKBENCH_DATA", Path.home() / ".cache" / "workbench"))


def cache_dir(family: str) -> Path:
    """The cache folder of one family of built-in domains (digits, scenes, figures)."""
    return data_root() / family


def check_domain(domain: str, domains: tuple[str, ...], family: str) -> str:
    """`domain` if it is one of the family's built-in domains, else a one-line error listing them."""
    if domain not in domains:
        raise ValueError(f"unknown built-in {family} domain {domain!r}: choose one of {', '.join(domains)} "
                         f"(e.g. builtin:{family}/{domains[0]})")
    return domain


@functools.lru_cache(maxsize=None)
def skimage_images(names: tuple[str, ...], mode: str) -> tuple[Image.Image, ...]:
    """scikit-image's bundled images `names`, converted to PIL `mode` (loaded once per process)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return tuple(Image.open(folder / name).convert(mode) for name in names)


def split_counts(variable: str, defaults: tuple[int, int], what: str, n_train: int | None = None,
                 n_test: int | None = None, n_val: int | None = None) -> tuple[int, int, int]:
    """(train, val, test) sizes of a generated benchmark: the arguments, else $variable="<train>,<test>[,<val>]",
    else `defaults` (train, test); val defaults to the test count. `what` names the items in errors."""
    train, test = defaults
    val = None
    override = os.environ.get(variable, "").strip()
    if override:
        try:
            values = [int(v) for v in override.split(",")]
            if len(values) not in (2, 3):
                raise ValueError
        except ValueError:
            raise ValueError(f"{variable}={override!r}: expected '<train>,<test>[,<val>]' {what} counts, "
                             f"e.g. 200,50 or 200,50,50") from None
        train, test, val = values[0], values[1], values[2] if len(values) == 3 else None
    train = n_train if n_train is not None else train
    test = n_test if n_test is not None else test
    val = n_val if n_val is not None else (val if val is not None else test)
    if min(train, val, test) < 1:
        raise ValueError(f"{what} counts must be positive, got {train} train / {val} val / {test} test")
    return train, val, test


def counts_suffix(counts: tuple[int, int, int], defaults: tuple[int, int]) -> str:
    """The cache name's mark of non-default (train, val, test) sizes: "" for the defaults, "-n<train>-<test>",
    then "-val<val>" where val differs from test."""
    train, val, test = counts
    return ("" if (train, test) == defaults else f"-n{train}-{test}") + (f"-val{val}" if val != test else "")


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(indices to fit on, indices held out): a seeded `fraction` of range(n) held out, both sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, int(round(n * fraction)))
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def build_folder(folder: Path, write: Callable[[Path], None], is_built: Callable[[Path], bool],
                 force: bool = False) -> Path:
    """A built-in domain's cache folder, written by `write(tmp)` under a temporary name and renamed into place
    when complete, so that a half-built folder is never taken as built. An incomplete folder (or any, with
    `force`) is replaced; when another process finishes the same build first, its folder is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if folder.exists() and (force or not is_built(folder)):   # replace it: set it aside, then drop it
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:   # fine when another process has just finished the same build: keep its folder
            if not is_built(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
