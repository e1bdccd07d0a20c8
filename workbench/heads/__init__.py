"""Dense heads behind one registry and one interface (their attention blocks: workbench.layers).

    from workbench.heads import create_head
    head = create_head("issa", backbone.feature_info, num_classes=19)
    logits, aux_logits = head(backbone.forward_features(images))   # at feature resolution

Interface (every head):

    pixel_features(feats) -> (z, aux_logits | None)   z: (N, D, h, w), the map that enters the classifier
    classifier            -> nn.Conv2d(D, K, 1) with bias, applied last:  logits = classifier(z)
    forward(feats)        -> (classifier(z), aux_logits | None)
    aux_weight            -> weight of the auxiliary loss in source training (0.0 without an aux head)

Everything but `classifier` is the trainable feature part: source-free adaptation freezes
`classifier` (SHOT's hypothesis) and adapts the rest, and `z` is SHOT's "bottleneck feature" for
clustering pixels. `features(feats)` is the same call as `pixel_features(feats)`. The auxiliary
logits, where a head has them, come at the resolution of the map the aux head reads, which may
differ from z's (e.g. stride 16 against stride 8): upsample each to the input separately.

Inputs. `feats` is the backbone's `forward_features` list and `feature_info` its description
([{"channels", "reduction"}, ...], finest first). Heads read it through `FeatureInput`:

    "last":    the deepest map;
    "concat":  every map bilinearly resized to the finest one and concatenated (HRNetV2, HRFormer);
    "auto":    "last" when its stride is at most 8 (a dilated ResNet at output stride 8, the
               setting of the FCN, ISA and ORDNet papers), otherwise every map resized to the
               stride-8 map and concatenated, i.e. the same output stride on backbones that keep
               every resolution (HRFormer, MobileNetV2): a stride-32 map alone is too coarse.

Defaults are the published values (REFERENCE.md 8.1-8.3): 512-channel heads, key 256, ISA groups
8 x 8, Dropout2d 0.05, aux weight 0.4. For tiny backbones scale them down with `channels=`
(key/value/aux widths follow it unless given).

A new head is one module in this package whose class is decorated with `@register_head("name",
task=...)`, plus one import line at the bottom of this file; `workbench heads` lists them.
"""

from __future__ import annotations

import inspect
from typing import Callable

_HEADS: dict[str, Callable[..., "DenseHead"]] = {}
TASKS = ("segmentation", "pose")


def register_head(name: str, task: str = "segmentation"):
    """Register a head class under `name` for `task` (segmentation: logits per class; pose: heatmaps per joint)."""
    if task not in TASKS:
        raise ValueError(f"unknown dense task {task!r}: choose one of {', '.join(TASKS)}")

    def decorator(cls):
        if name in _HEADS:
            raise ValueError(f"head {name!r} registered twice")
        cls.task = task
        _HEADS[name] = cls
        return cls
    return decorator


def list_heads(task: str | None = None) -> list[str]:
    """Registered heads, all or those of one task."""
    return sorted(name for name, cls in _HEADS.items() if task is None or cls.task == task)


def describe_heads(task: str | None = None) -> list[tuple[str, str, str]]:
    """(name, task, one-line summary) of each registered head, all or those of one task."""
    return [(name, _HEADS[name].task, getattr(_HEADS[name], "summary", "")) for name in list_heads(task)]


def create_head(name: str, feature_info: list[dict], num_classes: int, **kwargs) -> "DenseHead":
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}: choose one of {', '.join(list_heads())}")
    cls = _HEADS[name]
    try:
        inspect.signature(cls).bind(feature_info, num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"head {name!r} cannot be built with {sorted(kwargs)}: {exc}") from None
    return cls(feature_info, num_classes, **kwargs)


from .base import INPUT_MODES, AuxiliaryHead, DenseHead, FeatureInput, conv_bn_relu, resize  # noqa: E402,F401
from . import fcn, hrnet, issa, ocr, ordnet, pose  # noqa: E402,F401  (each module registers its heads)
