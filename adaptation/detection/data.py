"""Person boxes of video frames for the detector: every annotated frame of the videos that `--data` names
(`adaptation.tracking.data.load_videos`: the built-in crowds or PoseTrack files).

Each item is (image (3, H, W) float in [0, 1], target {"boxes" (n, 4) x1 y1 x2 y2, "labels" (n,), "image_id"}),
as torchvision's detectors take them. A COCO `bbox` [x, y, w, h] covers pixels x .. x + w - 1, whose
continuous extent is x .. x + w. Training mirrors half of the frames left to right (the augmentation of
torchvision's detection reference recipe)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..tracking.data import load_videos

FLIP = 0.5
MIN_BOX_SIDE = 2.0   # pixels: slivers of people at the frame's edge are not targets


def person_boxes(people) -> np.ndarray:
    """(n, 4) x1 y1 x2 y2 of the people with a box at least MIN_BOX_SIDE on each side."""
    boxes = [p.bbox for p in people if p.bbox is not None and min(p.bbox[2], p.bbox[3]) >= MIN_BOX_SIDE]
    if not boxes:
        return np.zeros((0, 4), np.float32)
    xywh = np.asarray(boxes, np.float32)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1).astype(np.float32)


class BoxDataset(Dataset):
    def __init__(self, spec: str, train: bool = False, split: str | None = None, **counts):
        self.spec, self.train = spec, train
        self.videos = load_videos(spec, split, **counts)
        self.frames = [frame for video in self.videos if video.annotated for frame in video.frames]
        if not self.frames:
            raise ValueError(f"{spec}: no annotated frames: a detector trains and is scored on PoseTrack "
                             f"annotations (builtin:crowds/<domain> or PoseTrack JSON files)")

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        frame = self.frames[index]
        image = frame.image()
        boxes = person_boxes(frame.people)
        if self.train and torch.rand(()) < FLIP:
            image, boxes = image[:, ::-1], mirror_boxes(boxes, image.shape[1])
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        target = {"boxes": torch.from_numpy(boxes).reshape(-1, 4), "labels": torch.ones(len(boxes), dtype=torch.int64),
                  "image_id": frame.image_id}
        return tensor, target

    def coco_ground_truth(self) -> dict:
        """The frames' person boxes as a COCO detection data set (for pycocotools' box AP)."""
        images, annotations = [], []
        for frame in self.frames:
            height, width = frame.image().shape[:2]
            images.append({"id": frame.image_id, "width": width, "height": height})
            for box in person_boxes(frame.people):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({"id": len(annotations) + 1, "image_id": frame.image_id, "category_id": 1,
                                    "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}


def collate(batch):
    """Lists of images and targets (torchvision's detectors take images of different sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
