"""Registered `rmoe_*` timm models and feature pyramids; importing this registers the models."""

from rmoe.models import swin, vit
from rmoe.models.features import PYRAMID_STRIDES, SimpleFeaturePyramid, SwinPyramid, pyramid_backbone

# `rmoe_*` arch -> timm's name of the same dense architecture (same module tree, same state-dict keys)
TIMM_DENSE_NAMES: dict[str, str] = {**vit.TIMM_DENSE_NAMES, **swin.TIMM_DENSE_NAMES}

__all__ = [
    "PYRAMID_STRIDES",
    "TIMM_DENSE_NAMES",
    "SimpleFeaturePyramid",
    "SwinPyramid",
    "pyramid_backbone",
    "swin",
    "vit",
]
