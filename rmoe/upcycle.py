"""Dense → MoE conversion of a timm model's MLPs, and the reverse merge for export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from timm.layers import Mlp
from torch import nn

from rmoe.moe.config import MoEConfig
from rmoe.moe.experts import ResidualExperts
from rmoe.moe.layer import MoEMlp

InitMode = Literal["upcycle", "scratch"]


def find_mlp_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks' MLPs (dense `Mlp` or `MoEMlp`) in depth order.

    ViT: `blocks.{i}.mlp`; Swin: `layers.{s}.blocks.{b}.mlp`; any model whose blocks hold an `.mlp`.
    The position in this list is the layer index used by layer selection.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] == "mlp" and isinstance(module, Mlp | MoEMlp)
    ]


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMlp)]


def convert_layers(
    model: nn.Module,
    layers: Sequence[int],
    config: MoEConfig,
    *,
    init: InitMode = "upcycle",
    seed: int = 0,
) -> list[str]:
    """Replace the MLPs at `layers` by MoE MLPs, in place; returns the converted module names.

    `init="upcycle"` starts the experts from the dense MLP (RMoE core + residual, or copies + noise
    when `config.residual` is False); `init="scratch"` initialises independent experts afresh.
    """
    mlps = find_mlp_layers(model)
    check_layer_indices(layers, len(mlps))
    generator = torch.Generator().manual_seed(seed)
    converted = []
    for index in sorted(set(layers)):
        name, mlp = mlps[index]
        if isinstance(mlp, MoEMlp):
            raise ValueError(f"layers: layer {index} ({name}) is already an MoE layer")
        if init == "upcycle" or config.residual:
            moe = MoEMlp.from_dense(mlp, config, generator=generator)
        else:
            moe = _fresh_experts(mlp, config)
        _set_submodule(model, name, moe)
        converted.append(name)
    return converted


def upcycle(model: nn.Module, layers: Sequence[int], config: MoEConfig, *, seed: int = 0) -> list[str]:
    """Turn the dense MLPs at `layers` into (residual) experts initialised from them."""
    return convert_layers(model, layers, config, init="upcycle", seed=seed)


def merge_residual_experts(model: nn.Module) -> nn.Module:
    """Fold every residual expert's θ⁰ + θʳₑ into plain stacked experts (for export/inference)."""
    for _, layer in moe_layers(model):
        if isinstance(layer.experts, ResidualExperts):
            layer.experts = layer.experts.merged()
    return model


def check_layer_indices(layers: Sequence[int], num_layers: int) -> None:
    """Raise a ValueError naming `moe_layers` for any index that is not an MLP layer of the model."""
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ValueError(
                f"moe_layers: unknown layer index {index!r}; "
                f"the model has {num_layers} MLP layers (0..{num_layers - 1})"
            )


def _fresh_experts(mlp: nn.Module, config: MoEConfig) -> MoEMlp:
    if not isinstance(mlp, Mlp):
        raise ValueError(f"mlp must be a timm Mlp, got {type(mlp).__name__}")
    fc1, fc2 = mlp.fc1, mlp.fc2
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    layer = MoEMlp.from_config(
        fc1.in_features,
        fc1.out_features,
        fc2.out_features,
        act_layer=type(mlp.act),
        bias=fc1.bias is not None,
        drop=float(mlp.drop1.p),
        config=config,
    )
    return layer.to(device=fc1.weight.device, dtype=fc1.weight.dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
