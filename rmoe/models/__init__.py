"""Registered `rmoe_*` timm models and feature pyramids; importing this registers the models."""

from rmoe.models import swin, vit
from rmoe.models.features import PYRAMID_STRIDES, SimpleFeaturePyramid, SwinPyramid, pyramid_backbone

__all__ = ["PYRAMID_STRIDES", "SimpleFeaturePyramid", "SwinPyramid", "pyramid_backbone", "swin", "vit"]
