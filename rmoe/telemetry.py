"""Per-forward MoE aux losses and telemetry gathered from a model's MoE layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmoe.moe.aux import MoEAux
from rmoe.moe.experts import ResidualExperts
from rmoe.upcycle import moe_layers


@dataclass
class MoEAuxSummary:
    """The model's total aux loss (add it to the task loss) and each layer's aux output."""

    loss: torch.Tensor
    layers: dict[str, MoEAux]

    def telemetry(self) -> dict[str, float]:
        """Flat scalars for logging: per layer load imbalance, drop fraction, router entropy, aux losses,
        and each expert's share of the routed tokens (`load_<i>`, for load-over-training plots)."""
        out: dict[str, float] = {}
        for name, aux in self.layers.items():
            load = aux.tokens_per_expert.detach().float()
            out[f"{name}/dropped_fraction"] = float(aux.dropped_fraction)
            out[f"{name}/router_entropy"] = float(aux.router_entropy)
            out[f"{name}/max_load"] = float(load.max() / load.mean().clamp_min(1e-9))
            fractions = (load / load.sum().clamp_min(1e-9)).tolist()
            out.update({f"{name}/load_{i}": float(f) for i, f in enumerate(fractions)})
            for loss_name, value in aux.losses.items():
                out[f"{name}/{loss_name}_loss"] = float(value.detach())
        return out


def collect_moe_aux(model: nn.Module) -> MoEAuxSummary:
    """Take (and clear) the aux outputs of the model's latest forward."""
    layers: dict[str, MoEAux] = {}
    for name, layer in moe_layers(model):
        aux = layer.pop_aux()
        if aux is not None:
            layers[name] = aux
    if layers:
        loss = torch.stack([aux.loss for aux in layers.values()]).sum()
    else:
        param = next(model.parameters(), None)
        loss = torch.zeros((), device=None if param is None else param.device)
    return MoEAuxSummary(loss, layers)


def forward_with_aux(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, MoEAuxSummary]:
    """Run the model and return its output together with this forward's aux losses/telemetry."""
    for _, layer in moe_layers(model):
        layer.pop_aux()
    out = model(x)
    return out, collect_moe_aux(model)


def residual_norm_ratios(model: nn.Module) -> dict[str, list[float]]:
    """‖θʳₑ‖ / ‖θ⁰‖ per expert for every residual MoE layer."""
    return {
        name: layer.experts.residual_norm_ratio().tolist()
        for name, layer in moe_layers(model)
        if isinstance(layer.experts, ResidualExperts)
    }
