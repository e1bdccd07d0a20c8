"""Reusable blocks of this research line, shared by backbones and dense heads."""

from .cifs import CIFS
from .coord_attention import CoordAttention
from .interlaced_attention import InterlacedSparseAttention, SelfAttention2d
from .local_window_attention import DepthwiseConvFFN, HRFormerBlock, LayerNorm2d, LocalWindowAttention
from .object_context import ObjectContextAttention, gather_object_regions
from .ordnet import MiddleRangeAttention, ReweightedLongRangeAttention

__all__ = ["CoordAttention", "InterlacedSparseAttention", "SelfAttention2d", "LocalWindowAttention",
           "DepthwiseConvFFN", "HRFormerBlock", "LayerNorm2d", "MiddleRangeAttention",
           "ReweightedLongRangeAttention", "CIFS", "ObjectContextAttention", "gather_object_regions"]
