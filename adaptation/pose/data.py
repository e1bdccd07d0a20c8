"""Top-down keypoint data: COCO keypoint JSON -> one person crop per annotation, with heatmap targets.

A pose data argument is one of
    builtin:figures/<domain>[:train|val|test] the built-in articulated figures (adaptation.pose.figures)
    path/to/annotations.json                  COCO keypoint JSON; `file_name`s resolve against the
                                              JSON's folder, else its `images/` sub-folder
    path/to/folder/                           a folder holding annotations.json (as above)

Every person annotation with at least one labelled joint (v > 0), not a crowd, is one sample. Its
box is grown to the input aspect ratio and by 1.25 (`box_to_center_scale`) and cropped with the
standard top-down affine (HRNet / SimpleBaseline): pixel centres at integer coordinates, the crop
sampled bilinearly with zeros outside the image (`torch.grid_sample`, align_corners=True, the
convention of cv2.warpAffine). Training augments as HRNet's COCO configs: scale x clip(1 + 0.35 n,
0.65, 1.35), rotation clip(45 n, -90, 90) degrees with probability 0.6, horizontal flip with
probability 0.5 (mirrored crop, left/right joints swapped), n ~ N(0, 1). Targets are Gaussian
heatmaps at 1/4 of the input (sigma 2 at 48 x 64, scaled with the heatmap) with one weight per
joint (0 for unlabelled joints and joints outside the map). As in HRNet, the target joints are the
crop's (mirrored) input joints divided by the stride: a crop mirrored as x -> iw - 1 - x has its
targets at hw - 1/4 - x_hm, exactly under its mirrored pixels (not at hw - 1 - x_hm, 0.75 px off).

Loading checks everything once: an empty file (no person with keypoints), a missing image, a
malformed box and keypoints of the wrong length raise a `DataError` naming the file, the
annotation and the fix; `num_joints` (a checkpoint's joint count) makes a different count an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..common import IMAGENET_MEAN, IMAGENET_STD, DataError, read_image
from . import figures
from .keypoints import affine_matrix, box_to_center_scale, gaussian_heatmaps, heatmap_sigma, transform_points

DEFAULT_INPUT_SIZE = (192, 256)       # (width, height): the COCO 256 x 192 setting
FIGURES_INPUT_SIZE = (96, 128)        # the built-in figures (canvas 128): same aspect, 1/4 of the pixels
HEATMAP_STRIDE = 4
SCALE_FACTOR, ROTATION_FACTOR, ROTATION_PROB, FLIP_PROB = 0.35, 45.0, 0.6, 0.5   # HRNet coco configs
BUILTIN = "builtin:figures/"


@dataclass
class PoseSource:
    """Where a pose data argument points: the COCO JSON, the image folder and a display name."""
    annotations: Path
    image_root: Path
    name: str
    builtin: str | None = None   # the built-in domain, if any


CROWDS = "builtin:crowds/"


def resolve_pose_data(spec: str) -> PoseSource:
    if spec.startswith(CROWDS):   # the people of the crowd videos: the figures' joints, looks and crops
        from ..tracking import crowds

        domain, _, split = spec[len(CROWDS):].partition(":")
        crowds.check_domain(domain)
        return PoseSource(crowds.coco_file(domain, split or "train"), crowds.build_domain(domain), spec, domain)
    if spec.startswith(BUILTIN):
        domain, _, split = spec[len(BUILTIN):].partition(":")
        split = split or "train"
        if domain not in figures.DOMAINS or split not in figures.SPLITS:
            raise DataError(f"unknown built-in pose data {spec!r}: use builtin:figures/<domain>"
                            f"[:{'|'.join(figures.SPLITS)}] with domain one of {', '.join(figures.DOMAINS)}")
        return PoseSource(figures.annotation_file(domain, split), figures.image_root(domain, split), spec, domain)
    path = Path(spec)
    if path.is_dir():
        path = path / "annotations.json"
    if not path.is_file():
        raise DataError(f"pose data {spec!r} not found: pass a COCO keypoint JSON, a folder holding annotations.json, "
                        f"builtin:figures/<domain>[:{'|'.join(figures.SPLITS)}] or builtin:crowds/<domain>[:split]")
    images = path.parent / "images"
    return PoseSource(path, images if images.is_dir() else path.parent, spec)


def builtin_figures_split(spec: str, split: str) -> str | None:
    """`split` of the built-in figures domain that `spec` names (None for user data)."""
    if spec.startswith(BUILTIN):
        return BUILTIN + spec[len(BUILTIN):].partition(":")[0] + ":" + split
    return None


def builtin_figures_val_split(spec: str) -> str | None:
    """Where checkpoints of a built-in figures domain are chosen (None for user data)."""
    return builtin_figures_split(spec, "val")


def builtin_figures_test_split(spec: str) -> str | None:
    """Where figures of a built-in figures domain are reported (None for user data)."""
    return builtin_figures_split(spec, "test")


def flip_permutation(num_joints: int, flip_pairs) -> list[int]:
    """Channel order after a horizontal flip: each left joint takes its right partner's place."""
    order = list(range(num_joints))
    for a, b in flip_pairs:
        order[a], order[b] = b, a
    return order


def mirror(matrix: np.ndarray, width: int) -> np.ndarray:
    """The 2x3 affine followed by a horizontal mirror of an output `width` pixels wide (x -> width - 1 - x)."""
    flip = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return (flip @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]


def input_to_heatmap(matrix: np.ndarray, input_size: tuple[int, int], heatmap_size: tuple[int, int]) -> np.ndarray:
    """An image -> input-crop affine as image -> heatmap: input pixels divided by the stride, per axis (HRNet's
    joints / feat_stride). Unmirrored this is the crop affine onto the heatmap itself (both put the window's
    centre at w/2, h/2); mirrored, the heatmap stays under the mirrored input's pixels."""
    stride = np.diag([heatmap_size[0] / input_size[0], heatmap_size[1] / input_size[1]])
    return stride @ matrix


def warp(image: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Crop (C, H, W) float image through the 2x3 image->output affine into size = (width, height)."""
    width, height = size
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    src = torch.from_numpy(inverse) @ torch.stack([xs.flatten(), ys.flatten(), torch.ones(xs.numel(),
                                                                                          dtype=torch.float64)])
    h, w = image.shape[-2:]
    grid = torch.stack([2 * src[0] / max(w - 1, 1) - 1, 2 * src[1] / max(h - 1, 1) - 1], dim=-1)
    grid = grid.reshape(1, height, width, 2).to(image.dtype)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


@dataclass
class View:
    """One crop of one person: `matrix` maps image pixels to heatmap pixels (mirror included)."""
    image: torch.Tensor
    matrix: np.ndarray
    flipped: bool


class KeypointDataset(Dataset):
    """Person crops of a COCO keypoint file. Items: dict(image, heatmaps, weights, index) in training
    and evaluation mode; `view(i, ...)` gives any other crop (the adaptation's two views)."""

    def __init__(self, spec: str, train: bool, num_joints: int | None = None,
                 input_size: tuple[int, int] | None = None, flip_pairs=None, joint_names=None):
        self.source = resolve_pose_data(spec)
        self.name, self.train = spec, train
        self.input_size = tuple(input_size or (FIGURES_INPUT_SIZE if self.source.builtin else DEFAULT_INPUT_SIZE))
        self.heatmap_size = (self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE)
        self.sigma = heatmap_sigma(self.heatmap_size)
        self._read(num_joints)
        if flip_pairs is None:
            flip_pairs = figures.FLIP_PAIRS if self.source.builtin else coco_flip_pairs(self.joint_names)
        self.flip_pairs = [tuple(p) for p in flip_pairs]
        self.flip_order = flip_permutation(self.num_joints, self.flip_pairs)
        if joint_names is not None and list(joint_names) != list(self.joint_names):
            raise DataError(f"{self.source.annotations}: joints {list(self.joint_names)} differ from the model's "
                            f"{list(joint_names)}: use data annotated with the model's joints")
        self.colour = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)

    # -------------------------------------------------------------- reading and checking
    def _read(self, num_joints: int | None) -> None:
        path = self.source.annotations
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}): pass a COCO keypoint annotation file") from None
        categories = {c["id"]: c for c in data.get("categories", []) if c.get("keypoints")}
        if not categories:
            raise DataError(f"{path} has no category with 'keypoints': pass a COCO keypoint annotation file")
        category = next(iter(categories.values()))
        self.joint_names = tuple(category["keypoints"])
        self.num_joints = len(self.joint_names)
        if num_joints is not None and num_joints != self.num_joints:
            raise DataError(f"{path} annotates {self.num_joints} keypoints but the model predicts {num_joints}: "
                            f"adapt or evaluate it on data with its {num_joints} joints")
        images = {im["id"]: im for im in data.get("images", [])}
        self.records = []
        for ann in data.get("annotations", []):
            if ann.get("category_id") not in categories or ann.get("iscrowd", 0) or ann.get("num_keypoints", 1) == 0:
                continue
            kps = np.asarray(ann.get("keypoints", []), dtype=np.float64)
            if kps.size != 3 * self.num_joints:
                raise DataError(f"{path}: annotation {ann.get('id')} has {kps.size} keypoint numbers, expected "
                                f"{3 * self.num_joints} (x, y, v for each of {self.num_joints} joints): fix the file")
            kps = kps.reshape(self.num_joints, 3)
            if not (kps[:, 2] > 0).any():
                continue
            try:
                center, size = box_to_center_scale(ann.get("bbox", []), self.input_size[0] / self.input_size[1])
            except ValueError as exc:
                raise DataError(f"{path}: annotation {ann.get('id')}: {exc}: fix or drop the box") from None
            image = images.get(ann["image_id"])
            if image is None:
                raise DataError(f"{path}: annotation {ann.get('id')} names image id {ann['image_id']} that is not in "
                                f"'images': fix the file")
            self.records.append({"id": ann.get("id"), "image_id": ann["image_id"],
                                 "file": self.source.image_root / image["file_name"], "center": center, "size": size,
                                 "box": np.asarray(ann["bbox"], dtype=np.float64), "keypoints": kps,
                                 "area": float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))})
        if not self.records:
            raise DataError(f"{path} holds no person annotation with labelled keypoints: pass a COCO keypoint file "
                            f"with annotations")
        missing = sorted({str(r["file"]) for r in self.records if not r["file"].is_file()})
        if missing:
            raise DataError(f"{path}: image {missing[0]} not found ({len(missing)} missing): put the images under "
                            f"{self.source.image_root} or fix 'file_name'")

    def __len__(self) -> int:
        return len(self.records)

    # -------------------------------------------------------------- crops
    def load_image(self, index: int) -> torch.Tensor:
        """(3, H, W) float in [0, 1]."""
        array = read_image(self.records[index]["file"], self.source.annotations,
                           lambda img: np.asarray(img.convert("RGB")))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def input_matrix(self, index: int, scale: float = 1.0, rotation: float = 0.0, flip: bool = False) -> np.ndarray:
        """Image pixels -> input-crop pixels for this person, with the given augmentation (the mirror in input
        pixels, x -> iw - 1 - x, so that the crop is exactly the flipped plain crop)."""
        r = self.records[index]
        matrix = affine_matrix(r["center"], r["size"] * scale, rotation, self.input_size)
        return mirror(matrix, self.input_size[0]) if flip else matrix

    def heatmap_matrix(self, index: int, scale: float = 1.0, rotation: float = 0.0, flip: bool = False) -> np.ndarray:
        """Image pixels -> heatmap pixels for this person's crop: the input affine divided by the stride."""
        return input_to_heatmap(self.input_matrix(index, scale, rotation, flip), self.input_size, self.heatmap_size)

    def view(self, index: int, scale: float = 1.0, rotation: float = 0.0, flip: bool = False, colour: bool = False,
             image: torch.Tensor | None = None) -> View:
        matrix = self.input_matrix(index, scale, rotation, flip)
        crop = warp(self.load_image(index) if image is None else image, matrix, self.input_size)
        if colour:
            crop = self.colour(crop)
        crop = v2.functional.normalize(crop, IMAGENET_MEAN, IMAGENET_STD)
        return View(crop, input_to_heatmap(matrix, self.input_size, self.heatmap_size), flip)

    def targets(self, index: int, matrix: np.ndarray, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian heatmaps (K, h, w) and weights (K,) of the labelled joints in a view."""
        kps = self.records[index]["keypoints"]
        joints = transform_points(kps[:, :2], matrix)
        visible = kps[:, 2] > 0
        if flipped:
            joints, visible = joints[self.flip_order], visible[self.flip_order]
        heatmaps, weights = gaussian_heatmaps(joints, visible, self.heatmap_size, self.sigma)
        return torch.from_numpy(heatmaps), torch.from_numpy(weights)

    def random_augmentation(self, generator: np.random.Generator) -> dict:
        scale = float(np.clip(generator.standard_normal() * SCALE_FACTOR + 1, 1 - SCALE_FACTOR, 1 + SCALE_FACTOR))
        rotation = (float(np.clip(generator.standard_normal() * ROTATION_FACTOR, -2 * ROTATION_FACTOR,
                                  2 * ROTATION_FACTOR)) if generator.random() <= ROTATION_PROB else 0.0)
        return {"scale": scale, "rotation": rotation, "flip": bool(generator.random() < FLIP_PROB)}

    def __getitem__(self, index: int) -> dict:
        aug = self.random_augmentation(_worker_generator()) if self.train else {}
        view = self.view(index, **aug)
        heatmaps, weights = self.targets(index, view.matrix, view.flipped)
        return {"image": view.image, "heatmaps": heatmaps, "weights": weights, "index": index}

    # -------------------------------------------------------------- ground truth for metrics
    def coco_ground_truth(self) -> dict:
        """A COCO keypoint dict of exactly this set's persons (a held-out subset scores against itself)."""
        image_ids = sorted({r["image_id"] for r in self.records})
        return {"images": [{"id": i} for i in image_ids],
                "annotations": [{"id": n + 1, "image_id": r["image_id"], "category_id": 1, "iscrowd": 0,
                                 "bbox": r["box"].tolist(), "area": r["area"],
                                 "keypoints": r["keypoints"].ravel().tolist(),
                                 "num_keypoints": int((r["keypoints"][:, 2] > 0).sum())}
                                for n, r in enumerate(self.records)],
                "categories": [{"id": 1, "name": "person", "keypoints": list(self.joint_names)}]}

    def ground_truth(self) -> dict[str, np.ndarray]:
        """Joints (N, K, 2) and labelled flags (N, K) in image pixels, boxes (N, 4), areas (N,), ids."""
        return {"joints": np.stack([r["keypoints"][:, :2] for r in self.records]),
                "visible": np.stack([r["keypoints"][:, 2] > 0 for r in self.records]),
                "boxes": np.stack([r["box"] for r in self.records]),
                "areas": np.array([r["area"] for r in self.records]),
                "image_ids": np.array([r["image_id"] for r in self.records])}


def _worker_generator() -> np.random.Generator:
    """A numpy stream drawn from torch's (seeded per run and per DataLoader worker)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def coco_flip_pairs(joint_names) -> list[tuple[int, int]]:
    """Left/right pairs by name (left_x <-> right_x), as COCO's 17 joints are named."""
    index = {n: i for i, n in enumerate(joint_names)}
    return [(i, index["right_" + n[5:]]) for n, i in index.items() if n.startswith("left_") and "right_" + n[5:] in index]
