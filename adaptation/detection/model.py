"""The person detector: torchvision's Faster R-CNN (Ren et al. 2015) with a feature pyramid (Lin et al. 2017)
over any registry backbone that gives multi-scale maps (`forward_features` + `feature_info`).

    detector = person_detector("resnet18")          # train: detector(images, targets) -> losses
    detections = detector.eval()(images)             # [{"boxes" (n, 4) xyxy, "scores", "labels"}]

torchvision's defaults are sized for COCO images of 800 pixels and up to 100 people; the built-in crowds are
128-pixel frames with up to five people 36-64 pixels tall, so the sizes below are scaled to them (stated
with the defaults they replace), and every other setting is torchvision's. Images enter at their own size
(`min_size` and `max_size` of the frame), normalised with ImageNet's statistics as torchvision does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from workbench.backbones import create_backbone

NUM_CLASSES = 2                          # background and person
FRAME_SIZE = 128                         # the built-in crowds' frames; torchvision: min 800, max 1333
PYRAMID_CHANNELS = 128                   # torchvision's resnet_fpn_backbone: 256
SMALLEST_ANCHOR = 16                     # pixels, on the finest level, doubling per level; COCO: 32 to 512
ASPECT_RATIOS = (1.0, 2.0, 3.0)          # height / width: standing people; COCO: 0.5, 1, 2
BOX_HEAD_WIDTH = 256                     # the two-layer box head; torchvision: 1024
RPN_PROPOSALS = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,   # torchvision: 2000 / 2000
                 "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}     # and 1000 / 1000
BOX_SAMPLES_PER_IMAGE = 128              # RoIs a training image contributes to the box head; torchvision: 512
DETECTIONS_PER_IMAGE = 20                # torchvision: 100


class PyramidBackbone(nn.Module):
    """A registry backbone's multi-scale maps through a feature pyramid (torchvision.ops), as torchvision's
    detectors take them: an OrderedDict of maps with `out_channels` channels each."""

    def __init__(self, backbone: str, channels: int = PYRAMID_CHANNELS, **backbone_kwargs):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = create_backbone(backbone, **backbone_kwargs)
        info = getattr(self.body, "feature_info", None)
        if not callable(getattr(self.body, "forward_features", None)) or not info:
            raise ValueError(f"backbone {backbone!r} gives no multi-scale features (forward_features + "
                             f"feature_info) for a detector: choose e.g. resnet18 or mobilenetv2_ca")
        self.fpn = FeaturePyramidNetwork([level["channels"] for level in info], channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = channels
        self.levels = len(info) + 1

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def person_detector(backbone: str = "resnet18", pretrained: str | None = None, frame_size: int = FRAME_SIZE):
    """Faster R-CNN with a feature pyramid on `backbone` (random initialisation unless `pretrained` names a
    local weight file the backbone reads)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    body = PyramidBackbone(backbone, **({"pretrained": pretrained} if pretrained else {}))
    anchors = AnchorGenerator(tuple((SMALLEST_ANCHOR * 2 ** i,) for i in range(body.levels)),
                              (ASPECT_RATIOS,) * body.levels)
    pooler = MultiScaleRoIAlign([str(i) for i in range(body.levels - 1)], output_size=7, sampling_ratio=2)
    return FasterRCNN(body, min_size=frame_size, max_size=frame_size,
                      rpn_anchor_generator=anchors, box_roi_pool=pooler,
                      box_head=TwoMLPHead(body.out_channels * 7 * 7, BOX_HEAD_WIDTH),
                      box_predictor=_predictor(BOX_HEAD_WIDTH), box_batch_size_per_image=BOX_SAMPLES_PER_IMAGE,
                      box_detections_per_img=DETECTIONS_PER_IMAGE, **RPN_PROPOSALS)


def _predictor(width: int):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(width, NUM_CLASSES)


def detector_config(backbone: str, frame_size: int) -> dict:
    return {"task": "detection", "backbone": backbone, "frame_size": int(frame_size)}


def build_detector(config: dict) -> nn.Module:
    return person_detector(config["backbone"], frame_size=config["frame_size"])
