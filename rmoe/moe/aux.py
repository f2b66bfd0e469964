"""Router auxiliary losses and telemetry, returned per forward (never kept in globals).

The losses are functions of batch-level statistics (sums over tokens), which `compute_aux` gathers
into one vector so a distributed dispatcher can sum them across workers before the losses are formed.
Shape suffixes: T tokens, E experts, K top-k slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rmoe.moe.config import AuxLossWeights
from rmoe.moe.routing import Routing, count_per_expert


def cv_squared(importance_E: torch.Tensor) -> torch.Tensor:
    """(std / mean)² with the population std, as in V-MoE."""
    return importance_E.var(correction=0) / importance_E.mean().pow(2).clamp_min(1e-12)


def importance_cv2_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """The paper's load-balance loss: (std / mean)² of per-expert importance Σₜ softmax(xₜ)ₑ.

    0 for perfectly even importance, E-1 when one expert takes it all.
    """
    return cv_squared(probs_TE.sum(0))


def switch_from_stats(importance_E: torch.Tensor, counts_E: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    E = importance_E.shape[0]
    fraction_E = counts_E / counts_E.sum().clamp_min(1)
    return E * (fraction_E * importance_E / num_tokens.clamp_min(1)).sum()


def switch_load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E · Σₑ fₑ·Pₑ: fₑ share of routed slots, Pₑ mean router probability.

    Its minimum, 1, is reached by uniform routing; E when every token goes to one expert.
    """
    counts_E = count_per_expert(expert_idx_TK, probs_TE.shape[-1], dtype=probs_TE.dtype)
    return switch_from_stats(probs_TE.sum(0), counts_E, torch.tensor(float(probs_TE.shape[0])))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)², keeping router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the routing distribution (nats); log E means undecided."""
    return -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()


@dataclass
class MoEAux:
    """Auxiliary losses (differentiable) and telemetry (detached) of one MoE forward."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor


def _identity(stats: torch.Tensor) -> torch.Tensor:
    return stats


def compute_aux(
    routing: Routing,
    weights: AuxLossWeights,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> MoEAux:
    """Losses and telemetry from batch statistics, summed by `reduce` (identity on one device)."""
    E = routing.num_experts
    probs_TE = routing.probs_TE
    routed_counts_E = count_per_expert(routing.expert_idx_TK, E, dtype=probs_TE.dtype)
    kept_counts_E = count_per_expert(routing.expert_idx_TK, E, weights=routing.kept_TK, dtype=probs_TE.dtype)
    with torch.no_grad():
        entropy_sum = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum()
    stats = torch.cat(
        [
            probs_TE.sum(0),
            routed_counts_E,
            kept_counts_E,
            torch.logsumexp(routing.logits_TE, dim=-1).pow(2).sum().reshape(1),
            entropy_sum.reshape(1),
            probs_TE.new_full((1,), float(probs_TE.shape[0])),  # a fill, not a host-to-device copy
        ]
    )
    stats = reduce(stats)
    importance_E, routed_E, kept_E = stats[:E], stats[E : 2 * E], stats[2 * E : 3 * E]
    z_sum, entropy_total, num_tokens = stats[3 * E], stats[3 * E + 1], stats[3 * E + 2]
    losses = {
        "importance": cv_squared(importance_E),
        "switch": switch_from_stats(importance_E, routed_E.detach(), num_tokens.detach()),
        "z": z_sum / num_tokens.detach(),
    }
    total = sum((getattr(weights, name) * value for name, value in losses.items()), probs_TE.new_zeros(()))
    with torch.no_grad():
        tokens_per_expert = kept_E.round().long()
        dropped = 1.0 - kept_E.sum() / routed_E.sum().clamp_min(1)
        entropy = entropy_total / num_tokens
    return MoEAux(total, losses, tokens_per_expert.detach(), dropped.detach(), entropy.detach())
