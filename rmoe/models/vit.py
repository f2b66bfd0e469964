"""Registered RMoE Vision Transformers (timm `VisionTransformer` with chosen MLPs as experts)."""

from __future__ import annotations

from typing import Any

from timm.models import VisionTransformer, generate_default_cfgs, register_model
from torch import nn

from rmoe.models._factory import create_rmoe_model, default_cfg

_ARCHS: dict[str, dict[str, Any]] = {
    # CPU-demo size: 32 px images, 8×8 patches of 4 px
    "rmoe_vit_nano_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10),
    "rmoe_vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "rmoe_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "rmoe_vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}

# timm's name of the same dense architecture: its state dicts (e.g. timm's own weights exported to
# safetensors) load into the dense `rmoe_*` model unchanged.
TIMM_DENSE_NAMES = {
    "rmoe_vit_tiny_patch16_224": "vit_tiny_patch16_224",
    "rmoe_vit_small_patch16_224": "vit_small_patch16_224",
    "rmoe_vit_base_patch16_224": "vit_base_patch16_224",
}

default_cfgs = generate_default_cfgs(
    {
        "rmoe_vit_nano_patch4_32": default_cfg((3, 32, 32), 10),
        "rmoe_vit_tiny_patch16_224": default_cfg((3, 224, 224), 1000),
        "rmoe_vit_small_patch16_224": default_cfg((3, 224, 224), 1000),
        "rmoe_vit_base_patch16_224": default_cfg((3, 224, 224), 1000),
    }
)


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    return create_rmoe_model(VisionTransformer, variant, _ARCHS[variant], pretrained, kwargs)


@register_model
def rmoe_vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_vit_nano_patch4_32", pretrained, kwargs)


@register_model
def rmoe_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_vit_tiny_patch16_224", pretrained, kwargs)


@register_model
def rmoe_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_vit_small_patch16_224", pretrained, kwargs)


@register_model
def rmoe_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_vit_base_patch16_224", pretrained, kwargs)
