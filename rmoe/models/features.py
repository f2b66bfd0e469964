"""Channels-first feature pyramids at strides 4/8/16/32 for detection and segmentation necks.

Swin's stages already sit at those strides (timm emits them NCHW through `forward_intermediates`);
a plain ViT has one scale, so `SimpleFeaturePyramid` rebuilds the others ViTDet-style
(transposed convolutions up, max-pooling down).
"""

from __future__ import annotations

import math

import torch
from timm.models import VisionTransformer
from timm.models.swin_transformer import SwinTransformer
from torch import nn

PYRAMID_STRIDES = (4, 8, 16, 32)


class _ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.norm(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _rescale(channels: int, factor: float) -> nn.Module:
    """Resample a stride-s map to stride s/factor (factor a power of two)."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        kernel = round(1 / factor)
        return nn.MaxPool2d(kernel_size=kernel, stride=kernel)
    steps: list[nn.Module] = []
    for i in range(round(math.log2(factor))):
        if i:
            steps += [_ChannelsFirstLayerNorm(channels), nn.GELU()]
        steps.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*steps)


class SimpleFeaturePyramid(nn.Module):
    """A ViT's last feature map resampled to strides 4/8/16/32 (ViTDet's simple feature pyramid)."""

    def __init__(self, vit: VisionTransformer, out_channels: int | None = None) -> None:
        super().__init__()
        self.vit = vit
        patch = vit.patch_embed.patch_size[0]
        dim = vit.embed_dim
        self.out_channels = out_channels or dim
        self.strides = PYRAMID_STRIDES
        self.levels = nn.ModuleList(
            nn.Sequential(
                _rescale(dim, patch / stride),
                nn.Conv2d(dim, self.out_channels, kernel_size=1, bias=False),
                _ChannelsFirstLayerNorm(self.out_channels),
            )
            for stride in self.strides
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.from_trunk(self.trunk_features(x))

    def trunk_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ViT's last feature map, NCHW (what the trunk alone computes)."""
        last = len(self.vit.blocks) - 1
        return self.vit.forward_intermediates(x, indices=[last], output_fmt="NCHW", intermediates_only=True)

    def from_trunk(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pyramid's levels from `trunk_features`' output."""
        (feature_BCHW,) = features
        return [level(feature_BCHW) for level in self.levels]


class SwinPyramid(nn.Module):
    """A Swin's four stage outputs, normalised, channels-first (strides 4/8/16/32 with patch 4)."""

    def __init__(self, swin: SwinTransformer) -> None:
        super().__init__()
        self.swin = swin
        self.out_channels = [info["num_chs"] for info in swin.feature_info]
        self.strides = tuple(info["reduction"] for info in swin.feature_info)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.from_trunk(self.trunk_features(x))

    def trunk_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four normalised stage outputs (the trunk alone computes the whole pyramid)."""
        return self.swin.forward_intermediates(x, indices=len(self.strides), norm=True, intermediates_only=True)

    def from_trunk(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(features)


def pyramid_backbone(model: nn.Module) -> SimpleFeaturePyramid | SwinPyramid:
    """Wrap a (RMoE) ViT or Swin so that `forward(images)` returns NCHW maps, finest first."""
    if isinstance(model, SwinTransformer):
        return SwinPyramid(model)
    if isinstance(model, VisionTransformer):
        return SimpleFeaturePyramid(model)
    raise ValueError(f"model: no feature pyramid for {type(model).__name__} (ViT and Swin are supported)")
