"""RMoE backbones for OpenMMLab: an `rmoe_*` timm trunk (dense or MoE) behind a feature pyramid that
returns NCHW maps at strides 4/8/16/32, registered in mmseg's and mmdet's `MODELS` as `RMoEViT` and
`RMoESwinTransformer`, so an ordinary mmseg/mmdet config file can name them.

The trunk is built from the same fields as a `ModelSpec` (arch, model_kwargs, moe_layers, moe), always
without its classifier. `checkpoint` loads an rmoe safetensors checkpoint (a stage's `model.safetensors`):
a dense checkpoint with `moe` set is upcycled (experts = core + noise), as the RMoE-D pipeline does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.model import BaseModule
from mmseg.registry import MODELS as MMSEG_MODELS
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from rmoe import (
    ModelSpec,
    MoEConfig,
    build_model,
    find_mlp_layers,
    load_state_dict_file,
    resolve_layers,
    spec_of,
    upcycle,
)
from rmoe.checkpoint import read_metadata
from rmoe.models import SimpleFeaturePyramid, SwinPyramid


def trunk_spec(
    arch: str,
    model_kwargs: dict[str, Any] | None = None,
    moe: dict[str, Any] | MoEConfig | None = None,
    moe_layers: str | list[int] | tuple[int, ...] = "every_other",
) -> ModelSpec:
    """The classifier-free trunk's spec (`num_classes=0`)."""
    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    spec = ModelSpec(arch, kwargs)
    if moe is None:
        return spec
    config = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(dict(moe))
    dense = build_model(spec)
    return spec.with_moe(tuple(resolve_layers(moe_layers, len(find_mlp_layers(dense)))), config)


def load_trunk_weights(trunk: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a (classification) model's weights into a classifier-free trunk: the classifier is dropped,
    a ViT's position embedding is resampled to the trunk's grid; anything else missing or unexpected
    (other than non-persistent buffers) is an error naming `source`."""
    own = trunk.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in own}
    if (
        isinstance(trunk, VisionTransformer)
        and "pos_embed" in state
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        prefix = 0 if trunk.no_embed_class else trunk.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(trunk.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source}: does not fit the backbone (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape mismatch {mismatched[:4]})"
        )
    trunk.load_state_dict(state)


def trunk_from_checkpoint(
    path: str, model_kwargs: dict[str, Any] | None, moe: dict[str, Any] | None, moe_layers: Any, seed: int = 0
) -> tuple[nn.Module, ModelSpec]:
    """The trunk of an rmoe checkpoint (its own spec, `model_kwargs` overriding, e.g. img_size), upcycled
    when the checkpoint is dense and `moe` is given."""
    meta = read_metadata(path)
    if "rmoe_spec" not in meta:
        raise ValueError(f"checkpoint {path!r}: carries no rmoe_spec (not an rmoe checkpoint)")
    spec = ModelSpec.from_json(meta["rmoe_spec"]).with_kwargs(**(model_kwargs or {}), num_classes=0)
    trunk = build_model(spec)
    load_trunk_weights(trunk, load_state_dict_file(path), f"checkpoint {path!r}")
    if moe is not None and not spec.is_moe:
        upcycle(trunk, moe_layers, MoEConfig.from_dict(dict(moe)), seed=seed)  # recorded in trunk.rmoe_spec
    return trunk, spec_of(trunk)


class RMoEBackbone(BaseModule):
    """An rmoe trunk behind a feature pyramid; `forward(images)` → 4 NCHW maps, finest (stride 4) first."""

    trunk_type: type[nn.Module] = nn.Module

    def __init__(
        self,
        arch: str,
        model_kwargs: dict[str, Any] | None = None,
        moe: dict[str, Any] | None = None,
        moe_layers: str | list[int] = "every_other",
        checkpoint: str | None = None,
        seed: int = 0,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if checkpoint is not None:
            trunk, spec = trunk_from_checkpoint(checkpoint, model_kwargs, moe, moe_layers, seed)
        else:
            spec = trunk_spec(arch, model_kwargs, moe, moe_layers)
            trunk = build_model(spec, seed=seed)
        if not isinstance(trunk, self.trunk_type):
            raise ValueError(f"{type(self).__name__}: arch {spec.arch!r} is not a {self.trunk_type.__name__}")
        self.spec = spec
        self.pyramid = self.build_pyramid(trunk)
        self._replayed_trunk: list[torch.Tensor] | None = None

    def build_pyramid(self, trunk: nn.Module) -> nn.Module:
        raise NotImplementedError

    @property
    def trunk(self) -> nn.Module:
        raise NotImplementedError

    @property
    def out_channels(self) -> list[int]:
        channels = self.pyramid.out_channels
        return list(channels) if isinstance(channels, (list, tuple)) else [channels] * 4

    def init_weights(self) -> None:
        """The trunk keeps the weights it was built or loaded with (mmengine would re-initialise it)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        replayed = self._replayed_trunk
        features = self.pyramid.trunk_features(x) if replayed is None else replayed
        return tuple(self.pyramid.from_trunk(features))

    def trunk_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the trunk alone computes for the pyramid (for cost accounting)."""
        return self.pyramid.trunk_features(x)

    @contextmanager
    def replaying_trunk(self, features: list[torch.Tensor]) -> Iterator[None]:
        """Within it, `forward` takes `features` as the trunk's output and does not run the trunk: cost
        accounting counts what comes after the trunk in one pass, the trunk run once beforehand, uncounted."""
        self._replayed_trunk = features
        try:
            yield
        finally:
            self._replayed_trunk = None


class RMoEViT(RMoEBackbone):
    """A (RMoE) ViT with ViTDet's simple feature pyramid; `pyramid_channels` (default embed_dim)."""

    trunk_type = VisionTransformer

    def __init__(self, *args: Any, pyramid_channels: int | None = None, **kwargs: Any) -> None:
        self._pyramid_channels = pyramid_channels
        super().__init__(*args, **kwargs)

    def build_pyramid(self, trunk: nn.Module) -> nn.Module:
        return SimpleFeaturePyramid(trunk, self._pyramid_channels)

    @property
    def trunk(self) -> nn.Module:
        return self.pyramid.vit


class RMoESwinTransformer(RMoEBackbone):
    """A (RMoE) Swin Transformer's four normalised stage outputs."""

    trunk_type = SwinTransformer

    def build_pyramid(self, trunk: nn.Module) -> nn.Module:
        return SwinPyramid(trunk)

    @property
    def trunk(self) -> nn.Module:
        return self.pyramid.swin


for _registry in (MMSEG_MODELS, MMDET_MODELS):
    _registry.register_module(module=RMoEViT, force=True)
    _registry.register_module(module=RMoESwinTransformer, force=True)
