"""Token dispatchers: move routed tokens to their experts and the experts' outputs back.

A dispatcher owns only data movement (permutation here; all-to-all in the expert-parallel one the
platform plugs in), never the layer's math. Shape suffixes: T tokens, K top-k slots, N dispatched
rows (kept slots, grouped contiguously by expert), D/O input/output width, E experts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from rmoe.moe.routing import Routing, count_per_expert


@dataclass
class Dispatched:
    """Rows for the experts: `x_ND` grouped by expert, `tokens_per_expert_E` rows per local expert, and
    `token_of_row_N`, the local token each row copies, where rows are this device's own tokens (None when
    they arrive from other devices): with it, work that depends on the token only runs once per token."""

    x_ND: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    state: object
    token_of_row_N: torch.Tensor | None = None


@dataclass
class LocalDispatchState:
    slot_order_N: torch.Tensor  # flat (token * K + slot) id of each dispatched row
    num_tokens: int
    top_k: int


class TokenDispatcher(ABC):
    """Moves tokens to experts (`dispatch`) and expert outputs back to (token, slot) order (`combine`)."""

    @abstractmethod
    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched: ...

    @abstractmethod
    def combine(self, y_NO: torch.Tensor, state: object) -> torch.Tensor:
        """Return y_TKO with zeros in dropped slots."""

    def reduce_sum(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum routing statistics over every replica that routes part of the same global batch.

        Aux losses are functions of batch-level statistics (per-expert importance, load); a distributed
        dispatcher sums them differentiably across workers so every worker sees the global values.
        """
        return stats


def sort_slots_by_expert(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept (token, slot) ids ordered by expert (stable), and the kept count per expert."""
    expert_of_slot = routing.expert_idx_TK.reshape(-1)
    if routing.capacity is None:
        slot_ids = torch.arange(expert_of_slot.numel(), device=expert_of_slot.device)
    else:
        slot_ids = routing.kept_TK.reshape(-1).nonzero().squeeze(1)
        expert_of_slot = expert_of_slot[slot_ids]
    order = torch.argsort(expert_of_slot, stable=True)
    counts_E = count_per_expert(expert_of_slot, routing.num_experts)
    return slot_ids[order], counts_E


class LocalDispatcher(TokenDispatcher):
    """Single-device dispatcher: a gather into expert order and an index_copy back."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        slot_order_N, counts_E = sort_slots_by_expert(routing)
        token_of_row_N = slot_order_N // routing.top_k
        x_ND = x_TD.index_select(0, token_of_row_N)
        state = LocalDispatchState(slot_order_N, x_TD.shape[0], routing.top_k)
        return Dispatched(x_ND, counts_E, state, token_of_row_N)

    def combine(self, y_NO: torch.Tensor, state: object) -> torch.Tensor:
        assert isinstance(state, LocalDispatchState)
        T, K = state.num_tokens, state.top_k
        every_slot = y_NO.shape[0] == T * K  # nothing dropped: the rows fill every slot, no zeros needed
        base = y_NO.new_empty if every_slot else y_NO.new_zeros
        # in place into the fresh buffer: the out-of-place index_copy would first copy all of it
        y_TKO = base(T * K, y_NO.shape[-1]).index_copy_(0, state.slot_order_N, y_NO)
        return y_TKO.view(T, K, y_NO.shape[-1])
