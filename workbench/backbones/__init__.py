"""Backbone registry: every family builds its feature extractor by name.

    from workbench.backbones import create_backbone
    net = create_backbone("impala_1x")      # nn.Module with .out_dim

A new backbone is one file that decorates its constructor with
`@register_backbone("name")` plus one import line below.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    def decorator(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}")
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as exc:  # an option this backbone does not have, e.g. features_only on a flat CNN
        raise ValueError(f"backbone {name!r} cannot be built with {sorted(kwargs)}: {exc}") from None
    if not hasattr(model, "out_dim") and not hasattr(model, "feature_info"):
        raise TypeError(f"backbone {name!r} exposes neither out_dim nor feature_info")
    return model


from . import digits, hrformer, impala, mobilenet_ca, resnet, t2t_vit  # noqa: E402,F401  (each module registers its backbones)
