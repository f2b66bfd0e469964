"""Top-k softmax router: linear + softmax + top-k, with capacity and batch-prioritised routing.

Shape suffixes: T tokens, D model width, E experts, K top-k slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """One forward's routing decision.

    `expert_idx_TK[t, k]` is token t's k-th choice, `gates_TK` its gate value (zeroed where dropped),
    `kept_TK` whether that slot fits in its expert's capacity.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    expert_idx_TK: torch.Tensor
    gates_TK: torch.Tensor
    kept_TK: torch.Tensor
    capacity: int | None

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_idx_TK.shape[-1]


def count_per_expert(
    expert_idx: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """How many entries of `expert_idx` (any shape) name each expert, each counted with its weight (default
    1). A scatter-add, not `torch.bincount`, which reads the largest index back to the host on CUDA."""
    flat = expert_idx.reshape(-1)
    ones = torch.ones_like(flat, dtype=dtype) if weights is None else weights.reshape(-1).to(dtype)
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(0, flat, ones)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor · tokens · k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    expert_idx_TK: torch.Tensor, priority_T: torch.Tensor | None, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which (token, slot) assignments fit within each expert's capacity.

    All tokens' first choices are served before any second choice (GShard/V-MoE); within a slot,
    tokens go in sequence order, or by `priority_T` descending (batch-prioritised routing).
    """
    T, K = expert_idx_TK.shape
    order_T = (
        torch.arange(T, device=expert_idx_TK.device)
        if priority_T is None
        else torch.argsort(priority_T, descending=True, stable=True)
    )
    idx_KT = expert_idx_TK[order_T].t()  # slot-major: all first choices, then all second choices
    onehot_KTE = nn.functional.one_hot(idx_KT, num_experts)
    position_KTE = torch.cumsum(onehot_KTE.reshape(K * T, num_experts), dim=0).reshape(K, T, num_experts)
    position_KT = (position_KTE * onehot_KTE).sum(-1) - 1
    kept_sorted_TK = (position_KT < capacity).t()
    kept_TK = torch.empty_like(kept_sorted_TK)
    kept_TK[order_T] = kept_sorted_TK
    return kept_TK


class TopKRouter(nn.Module):
    """Linear router with softmax gates and top-k selection (computed in float32)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        capacity_factor: float | None = None,
        batch_prioritized: bool = False,
        routing_groups: int = 1,
        noise_std: float = 0.0,
        normalize_top_k: bool = False,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.batch_prioritized = batch_prioritized
        self.routing_groups = routing_groups
        self.noise_std = noise_std
        self.normalize_top_k = normalize_top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        with torch.no_grad():  # sampled on CPU so a seeded CPU generator fixes it on any device
            self.gate.weight.copy_(torch.randn(num_experts, dim, generator=generator) * init_std)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # float32 routing keeps the softmax stable in bf16/fp16 models
            logits_TE = nn.functional.linear(x_TD.float(), self.gate.weight.float())
            if self.training and self.noise_std > 0:
                logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
            probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, expert_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_top_k and self.top_k > 1:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        capacity = None
        kept_TK = torch.ones_like(expert_idx_TK, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity, kept_TK = self._apply_capacity(expert_idx_TK, probs_TE)
            gates_TK = gates_TK * kept_TK
        return Routing(logits_TE, probs_TE, expert_idx_TK, gates_TK, kept_TK, capacity)

    def _apply_capacity(self, expert_idx_TK: torch.Tensor, probs_TE: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Capacity per routing group (contiguous token groups routed independently)."""
        T, G = expert_idx_TK.shape[0], self.routing_groups
        if T % G:
            raise ValueError(f"routing_groups ({G}) must divide the number of tokens in a forward ({T})")
        assert self.capacity_factor is not None
        capacity = expert_capacity(T // G, self.num_experts, self.top_k, self.capacity_factor)
        priority_T = probs_TE.max(-1).values.detach() if self.batch_prioritized else None
        idx_chunks = expert_idx_TK.chunk(G)
        priority_chunks = [None] * G if priority_T is None else list(priority_T.chunk(G))
        kept = [
            capacity_keep_mask(idx_TK, prio_T, self.num_experts, capacity)
            for idx_TK, prio_T in zip(idx_chunks, priority_chunks, strict=True)
        ]
        return capacity, torch.cat(kept)
