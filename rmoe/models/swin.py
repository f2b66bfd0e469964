"""Registered RMoE Swin Transformers (timm `SwinTransformer` with chosen MLPs as experts).

Layer indices count blocks across stages in depth order (Swin-T: 2 + 2 + 6 + 2 = 12 MLPs).
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from rmoe.models._factory import create_rmoe_model, default_cfg

_ARCHS: dict[str, dict[str, Any]] = {
    # CPU-demo size: 64 px images give feature maps at strides 4/8/16/32 (16, 8, 4, 2 px)
    "rmoe_swin_nano_patch4_window4_64": dict(
        img_size=64,
        patch_size=4,
        window_size=4,
        embed_dim=48,
        depths=(2, 2, 2, 2),
        num_heads=(2, 4, 8, 16),
        num_classes=10,
        drop_path_rate=0.0,
    ),
    "rmoe_swin_tiny_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
}

# timm's name of the same dense architecture (see `rmoe.models.vit.TIMM_DENSE_NAMES`).
TIMM_DENSE_NAMES = {"rmoe_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224"}

default_cfgs = generate_default_cfgs(
    {
        "rmoe_swin_nano_patch4_window4_64": default_cfg((3, 64, 64), 10),
        "rmoe_swin_tiny_patch4_window7_224": default_cfg((3, 224, 224), 1000),
    }
)


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    return create_rmoe_model(SwinTransformer, variant, _ARCHS[variant], pretrained, kwargs)


@register_model
def rmoe_swin_nano_patch4_window4_64(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_swin_nano_patch4_window4_64", pretrained, kwargs)


@register_model
def rmoe_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create("rmoe_swin_tiny_patch4_window7_224", pretrained, kwargs)
