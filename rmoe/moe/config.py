"""Typed, self-validating configuration of one MoE MLP layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ExpertBackend = Literal["auto", "padded", "grouped_mm", "loop"]
_BACKENDS = ("auto", "padded", "grouped_mm", "loop")


@dataclass(frozen=True)
class AuxLossWeights:
    """Weights of the router's auxiliary losses in the layer's total aux loss.

    `importance` is the paper's load-balance loss (CV² of per-expert importance, as in V-MoE);
    `switch` the Switch-Transformer load-balance loss; `z` the router z-loss (ST-MoE).
    """

    importance: float = 0.01
    switch: float = 0.0
    z: float = 0.0

    def __post_init__(self) -> None:
        for name in ("importance", "switch", "z"):
            if getattr(self, name) < 0:
                raise ValueError(f"aux_weights.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class MoEConfig:
    """How an MLP becomes a (residual) mixture of experts.

    Routing: `top_k` of `num_experts`; `capacity_factor=None` is dropless, otherwise each expert takes
    at most ceil(capacity_factor * tokens * top_k / num_experts) tokens per forward and the rest are
    dropped (they pass through the block's residual connection). `batch_prioritized` gives capacity to
    the most confident tokens first (V-MoE's BPR). `noise_std` adds N(0, noise_std²) to router logits
    in training (V-MoE uses 1/num_experts).

    Experts: `residual=True` makes each expert core θ⁰ (shared, from the dense MLP) plus a residual θʳₑ,
    full-rank or of rank `residual_rank`; `freeze_core` stops gradients into θ⁰. `init_noise` is the std
    of the residual at initialisation relative to the core weights' std (0 = exact copy of the core).
    `residual=False` gives independent experts (MoE from scratch, or Sparse-Upcycling-style copies).

    Combine: `alignment=True` is the paper's stop-gradient alignment, whose forward value is the mean of
    the selected experts' outputs (exactly the paper's formula for top-1), so a dense→MoE switch keeps the
    output scale; `alignment=False` is plain gate weighting Σ Gᵢ·Eᵢ(x).
    """

    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float | None = None
    batch_prioritized: bool = False
    routing_groups: int = 1
    noise_std: float = 0.0
    normalize_top_k: bool = False
    alignment: bool = True
    residual: bool = True
    residual_rank: int | None = None
    freeze_core: bool = True
    init_noise: float = 0.01
    aux_weights: AuxLossWeights = field(default_factory=AuxLossWeights)
    expert_backend: ExpertBackend = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.aux_weights, dict):
            object.__setattr__(self, "aux_weights", AuxLossWeights(**self.aux_weights))
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
        if not isinstance(self.routing_groups, int) or self.routing_groups < 1:
            raise ValueError(f"routing_groups must be a positive int, got {self.routing_groups!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.init_noise < 0:
            raise ValueError(f"init_noise must be >= 0, got {self.init_noise}")
        if self.residual_rank is not None:
            if not self.residual:
                raise ValueError("residual_rank requires residual=True")
            if not isinstance(self.residual_rank, int) or self.residual_rank < 1:
                raise ValueError(f"residual_rank must be a positive int, got {self.residual_rank!r}")
        if self.expert_backend not in _BACKENDS:
            raise ValueError(f"expert_backend must be one of {_BACKENDS}, got {self.expert_backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoE config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)
