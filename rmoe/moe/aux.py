"""Router auxiliary losses and telemetry, returned per forward (never kept in globals).

Shape suffixes: T tokens, E experts, K top-k slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rmoe.moe.config import AuxLossWeights
from rmoe.moe.routing import Routing


def importance_cv2_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """The paper's load-balance loss: (std / mean)² of per-expert importance Σₜ softmax(xₜ)ₑ.

    Population std, as in V-MoE. 0 for perfectly even importance, E-1 when one expert takes it all.
    """
    importance_E = probs_TE.sum(0)
    return importance_E.var(correction=0) / importance_E.mean().pow(2).clamp_min(1e-12)


def switch_load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E · Σₑ fₑ·Pₑ: fₑ share of routed slots, Pₑ mean router probability.

    Its minimum, 1, is reached by uniform routing; E when every token goes to one expert.
    """
    E = probs_TE.shape[-1]
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    fraction_E = counts_E / expert_idx_TK.numel()
    return E * (fraction_E * probs_TE.mean(0)).sum()


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
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def compute_aux(routing: Routing, weights: AuxLossWeights) -> MoEAux:
    losses = {
        "importance": importance_cv2_loss(routing.probs_TE),
        "switch": switch_load_balance_loss(routing.probs_TE, routing.expert_idx_TK),
        "z": router_z_loss(routing.logits_TE),
    }
    total = weights.importance * losses["importance"] + weights.switch * losses["switch"] + weights.z * losses["z"]
    kept_idx = routing.expert_idx_TK[routing.kept_TK]
    with torch.no_grad():
        tokens_per_expert = torch.bincount(kept_idx, minlength=routing.num_experts)
        dropped = 1.0 - routing.kept_TK.float().mean()
        entropy = router_entropy(routing.probs_TE)
    return MoEAux(total, losses, tokens_per_expert, dropped, entropy)
