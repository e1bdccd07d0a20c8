"""SegmentationModel: a registry backbone's multi-scale features + a registry dense head.

    model = SegmentationModel("resnet18", "issa", num_classes=11, head_kwargs={"channels": 128})
    logits = model(images)                       # (N, K, H, W) at input resolution
    logits, aux = model.forward_train(images)    # both at input resolution (aux None without aux head)
    z = model.pixel_features(images)             # (N, D, h, w): what enters model.classifier

The split is SHOT's: `model.classifier` (the head's final 1x1 conv) is the hypothesis that
source-free adaptation freezes; backbone and the rest of the head are the feature extractor it
adapts, and `pixel_features` gives the per-pixel "bottleneck" features it clusters.

Any backbone with `forward_features` and `feature_info` works. ResNets are built at output stride
8 (dilated last two stages, as segmentation uses them) unless `backbone_kwargs` says otherwise.
Logits are upsampled bilinearly with align_corners=False.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from workbench.backbones import create_backbone, list_backbones
from workbench.checkpoint import CheckpointError, load_checkpoint
from workbench.heads import DenseHead, create_head, list_heads, resize

# backbones built at another output stride than their classification default for segmentation
# (the DTN at 4: its stride-8 map is 8 x 8 on a 64 x 64 scene, too coarse for digit strokes)
SEGMENTATION_BACKBONE_DEFAULTS = {"resnet18": {"output_stride": 8}, "resnet50": {"output_stride": 8},
                                  "resnet101": {"output_stride": 8}, "dtn": {"output_stride": 4}}


def _has_dense_features(net: nn.Module) -> bool:
    return callable(getattr(net, "forward_features", None)) and bool(getattr(net, "feature_info", None))


@functools.lru_cache(maxsize=1)
def dense_backbones() -> tuple[str, ...]:
    """Registry backbones that give multi-scale features (built on the meta device: no memory, ~2 s)."""
    names = []
    for name in list_backbones():
        try:
            with torch.device("meta"):
                net = create_backbone(name)
        except Exception:  # noqa: BLE001  (a backbone that cannot be built this way is not offered)
            continue
        if _has_dense_features(net):
            names.append(name)
    return tuple(names)


def backbone_kwargs_for(task: str, backbone: str, backbone_kwargs: dict | None = None) -> dict:
    """The caller's kwargs on top of the task's defaults (segmentation ResNets: output_stride=8; pose
    keeps the classification strides, SimpleBaseline's deconvolutions start from stride 32)."""
    defaults = SEGMENTATION_BACKBONE_DEFAULTS.get(backbone, {}) if task == "segmentation" else {}
    return {**defaults, **(backbone_kwargs or {})}


class DenseModel(nn.Module):
    """A registry backbone's `forward_features` + a dense head of this model's task; `classifier` is
    the head's final 1x1 conv, the frozen hypothesis of source-free adaptation."""

    task = "segmentation"

    def __init__(self, backbone: str, head: str, num_classes: int, backbone_kwargs: dict | None = None,
                 head_kwargs: dict | None = None):
        super().__init__()
        heads = list_heads(self.task)
        if head in list_heads() and head not in heads:
            raise ValueError(f"head {head!r} is not a {self.task} head: choose one of {', '.join(heads)}")
        net = create_backbone(backbone, **backbone_kwargs_for(self.task, backbone, backbone_kwargs))
        if not _has_dense_features(net):
            raise ValueError(f"backbone {backbone!r} gives no multi-scale features (forward_features + feature_info) "
                             f"for a dense head: choose one of {', '.join(dense_backbones())}")
        self.backbone = net
        self.head: DenseHead = create_head(head, net.feature_info, num_classes, **(head_kwargs or {}))
        self.num_classes = num_classes

    @property
    def classifier(self) -> nn.Conv2d:
        """The head's final 1x1 conv: frozen during adaptation."""
        return self.head.classifier

    def pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w): the per-pixel features entering the classifier, at feature resolution."""
        return self.head.pixel_features(self.backbone.forward_features(x), with_aux=False)[0]


class SegmentationModel(DenseModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W) at input resolution (the aux head, if separate, is skipped)."""
        logits, _ = self.head(self.backbone.forward_features(x), with_aux=False)
        return resize(logits, x.shape[-2:])

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, aux_logits or None), both at input resolution; loss = CE(logits) + aux_weight CE(aux)."""
        logits, aux = self.head(self.backbone.forward_features(x), with_aux=True)
        size = x.shape[-2:]
        return resize(logits, size), (resize(aux, size) if aux is not None else None)


class PoseModel(DenseModel):
    """Top-down pose: a person crop -> K joint heatmaps at the head's resolution (1/4 of the input
    for `heatmap` and `deconv`). `num_classes` is the number of joints."""

    task = "pose"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x), with_aux=False)[0]


MODELS = {"segmentation": SegmentationModel, "pose": PoseModel}


def dense_model_config(backbone: str, head: str, num_classes: int, backbone_kwargs: dict | None = None,
                       head_kwargs: dict | None = None, image_size=None, task: str = "segmentation") -> dict:
    """Everything needed to rebuild a SegmentationModel or PoseModel (JSON-able; stored in
    checkpoints). The backbone kwargs are recorded resolved, e.g. a ResNet's output_stride=8."""
    return {"task": task, "backbone": backbone, "head": head, "num_classes": int(num_classes),
            "backbone_kwargs": backbone_kwargs_for(task, backbone, backbone_kwargs),
            "head_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in (head_kwargs or {}).items()},
            "image_size": image_size}


def build_dense_model(config: dict) -> DenseModel:
    """A SegmentationModel or PoseModel (by the config's task) from `dense_model_config`'s dict (local
    pretrained-weight paths are dropped: the checkpoint's state dict carries the weights)."""
    missing = [k for k in ("backbone", "head", "num_classes") if k not in config]
    if missing:
        raise ValueError(f"not a dense model config: missing {', '.join(missing)}")
    backbone_kwargs = {k: v for k, v in (config.get("backbone_kwargs") or {}).items() if k != "pretrained"}
    return MODELS[config.get("task", "segmentation")](config["backbone"], config["head"], config["num_classes"],
                                                      backbone_kwargs, config.get("head_kwargs") or {})


MODEL_KINDS = ("source-model", "adapted-model")


def checkpoint_task(state: dict) -> str:
    """The task a model checkpoint names; checkpoints written before tasks existed are classification."""
    return state.get("task", "classification")


def load_dense_model(path, runtime, task: str = "segmentation"):
    """(model in eval mode, checkpoint dict) of a dense checkpoint of `task` (segmentation or pose); any
    other task is a clear error."""
    state = load_checkpoint(path, kind=MODEL_KINDS, map_location=runtime.device)
    stored = checkpoint_task(state)
    if stored != task:
        raise CheckpointError(f"{path} holds a {stored} model, not a {task} model: pass a checkpoint from "
                              f"`train-source --task {task}` or use --task {stored}")
    model = runtime.prepare_module(build_dense_model(state["model_config"]))
    check_dense_state(path, state, model)
    model.load_state_dict(state["model"])
    return model.eval(), state


def check_dense_state(path, state: dict, model) -> None:
    """A one-line CheckpointError when the stored weights do not fit the model their config builds
    today: the one-conv fcn head of before issue 34 (keys head.conv.*), or any other change of layers."""
    stored, expected = set(state["model"]), set(model.state_dict())
    if stored == expected:
        return
    if state["model_config"].get("head") == "fcn" and any(k.startswith("head.conv.") for k in stored):
        raise CheckpointError(f"{path} holds an fcn model with the old one-conv head (head.conv.*); the fcn head is "
                              f"now mmsegmentation's (num_convs=2 3x3 convs + input concat), so retrain the "
                              f"source model with this version")
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    raise CheckpointError(f"{path} does not fit the {state['model_config'].get('head')} model its config builds "
                          f"today: {len(missing)} missing state entries ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
                          f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); retrain it")
