"""Dense → MoE conversion of a timm model's MLPs (which layers: a fixed pattern or explicit indices), and
the reverse merge for export. A model that carries its `ModelSpec` (`model.rmoe_spec`) has the conversion
recorded there by the same call, so the spec always rebuilds the module tree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from timm.layers import Mlp
from torch import nn

from rmoe.moe.config import MoEConfig
from rmoe.moe.experts import ResidualExperts
from rmoe.moe.layer import MoEMlp

if TYPE_CHECKING:
    from rmoe.spec import ModelSpec

InitMode = Literal["upcycle", "scratch"]
LayerSpec = str | Sequence[int]  # a selection: every_other, last_<n>, all, none, "1,3", or indices


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
    layers: LayerSpec,
    config: MoEConfig,
    *,
    init: InitMode = "upcycle",
    seed: int = 0,
) -> list[str]:
    """Replace the MLPs selected by `layers` (see `resolve_layers`) by MoE MLPs, in place; returns the
    converted module names. `model.rmoe_spec`, when the model has one, records the conversion.

    `init="upcycle"` starts the experts from the dense MLP (RMoE core + residual, or copies + noise
    when `config.residual` is False); `init="scratch"` initialises independent experts afresh.
    Everything is checked before any layer changes: a bad selection leaves the model as it was.
    """
    mlps = find_mlp_layers(model)
    indices = resolve_layers(layers, len(mlps))
    for index in indices:
        name, mlp = mlps[index]
        if isinstance(mlp, MoEMlp):
            raise ValueError(f"layers: layer {index} ({name}) is already an MoE layer")
    spec: ModelSpec | None = getattr(model, "rmoe_spec", None)
    if spec is not None and spec.is_moe and spec.moe != config:
        raise ValueError(
            f"config: the model's MoE layers {list(spec.moe_layers)} use another MoE config, and a model spec "
            "holds one; convert all layers with one config"
        )
    generator = torch.Generator().manual_seed(seed)
    converted = []
    for index in indices:
        name, mlp = mlps[index]
        if init == "upcycle" or config.residual:
            moe = MoEMlp.from_dense(mlp, config, generator=generator)
        else:
            moe = _fresh_experts(mlp, config)
        _set_submodule(model, name, moe)
        converted.append(name)
    if spec is not None:
        model.rmoe_spec = spec.with_moe(sorted({*spec.moe_layers, *indices}), config)
    return converted


def upcycle(model: nn.Module, layers: LayerSpec, config: MoEConfig, *, seed: int = 0) -> list[str]:
    """Turn the dense MLPs selected by `layers` into (residual) experts initialised from them (recorded in
    `model.rmoe_spec` when the model has one)."""
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


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Static selection: 'every_other' (1, 3, 5, … as in V-MoE), 'last_<n>', 'all', 'none',
    '1,3,5' or a sequence of indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "every_other":
            return list(range(1, num_layers, 2))
        if text == "all":
            return list(range(num_layers))
        if text in ("none", ""):
            return []
        if text.startswith("last_"):
            n = _positive_int(text.removeprefix("last_"), spec)
            if n > num_layers:
                raise ValueError(f"moe_layers: {spec!r} asks for {n} layers but the model has {num_layers}")
            return list(range(num_layers - n, num_layers))
        if text.startswith("firefly"):
            raise ValueError("moe_layers: 'firefly' needs calibration data; use rmoe.select_firefly(...)")
        try:
            indices = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"moe_layers: unknown selection {spec!r}; use every_other, last_<n>, all, none, "
                "explicit indices like '1,3', or firefly via rmoe.select_firefly"
            ) from None
    else:
        indices = list(spec)
    check_layer_indices(indices, num_layers)
    return sorted(set(indices))


def _positive_int(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"moe_layers: {spec!r} needs a positive layer count")
    return int(text)


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
