"""The role a parameter plays in an MoE layer (router, shared core θ⁰, residual θʳₑ, plain expert), decided
from its name alone. The one place that knows the names: training (trainable and optimizer groups) and
checkpoint readers decide roles here. Standard library only, so a reader without torch (the dashboard)
loads this file on its own.

Names: an MoE layer `<layer>` (e.g. `blocks.1.mlp`) holds `<layer>.router.<...>` (the gate) and
`<layer>.experts.<tensor>`, where `<tensor>` is `core_*` (θ⁰), `res_*` (θʳₑ, full or low rank) or a plain
expert stack (`w1_EDH`, `b1_EH`, …); see `rmoe.moe.experts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ParamRole = Literal["router", "core", "residual", "expert"]
ROLES: tuple[ParamRole, ...] = ("router", "core", "residual", "expert")
_WEIGHTS = ("w1", "w2")


@dataclass(frozen=True)
class MoEParameter:
    """A parameter (or tensor of a checkpoint) of an MoE layer."""

    layer: str  # the MoE layer's module path, e.g. "blocks.1.mlp"
    role: ParamRole
    tensor: str  # its name inside the router or the experts, e.g. "gate.weight", "core_w1_DH"

    @property
    def is_expert_weight(self) -> bool:
        """An experts' weight matrix or factor (w1/w2 stacks, cores, residuals), not a bias or the router."""
        return self.role != "router" and any(part in _WEIGHTS for part in self.tensor.split("_"))


def moe_parameter(name: str) -> MoEParameter | None:
    """What `name` is in its MoE layer, or None when it is not an MoE layer's parameter."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] == "experts":
        tensor = parts[-1]
        role: ParamRole = "expert"
        if tensor.startswith(("core_", "res_")):
            role = "core" if tensor.startswith("core_") else "residual"
        return MoEParameter(".".join(parts[:-2]), role, tensor)
    if "router" in parts[1:-1]:
        at = len(parts) - 1 - parts[::-1].index("router")
        return MoEParameter(".".join(parts[:at]), "router", ".".join(parts[at + 1 :]))
    return None


def parameter_role(name: str) -> ParamRole | None:
    """The role of parameter `name` in its MoE layer (router, core, residual, expert), or None outside one."""
    found = moe_parameter(name)
    return None if found is None else found.role


__all__ = ["ROLES", "MoEParameter", "ParamRole", "moe_parameter", "parameter_role"]
