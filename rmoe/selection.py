"""Which MLP layers become MoE: fixed patterns, explicit indices, or a gradient (Firefly) score.

Firefly splitting score (first-order Taylor). For candidate MLP l with parameters W, split its
calibration tokens into E groups the way an untrained router would (argmax of a fixed random
projection of the MLP input) and let Gₑ = Σ_{t ∈ group e} ∂L/∂W be group e's share of the gradient.
Splitting W into E experts lets each move on its own tokens: a step of length η per expert decreases
the loss by η·Σₑ‖Gₑ‖ to first order, while the unsplit layer gets only η·‖Σₑ Gₑ‖. The score

    S_l = Σₑ ‖Gₑ‖ − ‖Σₑ Gₑ‖   (≥ 0 by the triangle inequality; Frobenius norm over fc1 and fc2)

is the extra first-order loss decrease per unit step that splitting buys: zero when all groups want
the same update (an expert would only duplicate the dense layer), large when token groups pull in
different directions. The `n` layers with the largest S_l are converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rmoe.upcycle import find_mlp_layers


@dataclass
class _Capture:
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def firefly_scores(
    model: nn.Module,
    batch: object,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    num_experts: int = 8,
    seed: int = 0,
) -> list[float]:
    """Firefly splitting score S_l of every dense MLP layer (module docstring), in layer order.

    `loss_fn(model, batch)` returns the scalar calibration loss. Parameter `.grad`s are untouched.
    """
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2 to score a split, got {num_experts}")
    mlps = find_mlp_layers(model)
    captures: dict[str, _Capture] = {}
    handles = []
    for name, mlp in mlps:
        for fc_name in ("fc1", "fc2"):
            key = f"{name}.{fc_name}"
            captures[key] = _Capture([], [])
            handles.append(getattr(mlp, fc_name).register_forward_hook(_capture_hook(captures[key])))
    try:
        loss = loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [out for cap in captures.values() for out in cap.outputs]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    grad_of = dict(zip(map(id, outputs), grads, strict=True))
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for name, _ in mlps:
        fc1_inputs = captures[f"{name}.fc1"].inputs
        projection_DE = torch.randn(fc1_inputs[0].shape[-1], num_experts, generator=generator)
        group_T = torch.cat([_groups(x, projection_DE) for x in fc1_inputs])
        per_group_sq_E = torch.zeros(num_experts, dtype=torch.float64)
        total_sq = torch.zeros((), dtype=torch.float64)
        for fc_name in ("fc1", "fc2"):
            cap = captures[f"{name}.{fc_name}"]
            dys = [grad_of[id(out)] for out in cap.outputs]
            if any(dy is None for dy in dys):
                continue  # this layer does not influence the loss
            x_TI = torch.cat([x.reshape(-1, x.shape[-1]) for x in cap.inputs])
            dy_TO = torch.cat([dy.reshape(-1, dy.shape[-1]) for dy in dys])  # type: ignore[union-attr]
            g_sq_E, total_g_sq = _group_gradients(x_TI, dy_TO, group_T, num_experts)
            per_group_sq_E += g_sq_E
            total_sq += total_g_sq
        scores.append(float(per_group_sq_E.sqrt().sum() - total_sq.sqrt()))
    return scores


def select_firefly(
    model: nn.Module,
    n: int,
    batch: object,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    num_experts: int = 8,
    seed: int = 0,
) -> list[int]:
    """Indices of the `n` MLP layers with the highest Firefly splitting score (sorted)."""
    scores = firefly_scores(model, batch, loss_fn, num_experts=num_experts, seed=seed)
    if not 1 <= n <= len(scores):
        raise ValueError(f"n must be in 1..{len(scores)}, got {n}")
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return sorted(ranked[:n])


def _capture_hook(capture: _Capture) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        capture.inputs.append(args[0].detach())
        capture.outputs.append(output)

    return hook


def _groups(x: torch.Tensor, projection_DE: torch.Tensor) -> torch.Tensor:
    """The untrained-router stand-in: argmax of a fixed random projection of the MLP input."""
    x_TD = x.reshape(-1, x.shape[-1]).float().cpu()
    x_TD = nn.functional.layer_norm(x_TD, x_TD.shape[-1:])
    return (x_TD @ projection_DE).argmax(-1)


def _group_gradients(
    x_TI: torch.Tensor, dy_TO: torch.Tensor, group_T: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared Frobenius norms of each group's weight+bias gradient, and of their sum."""
    x_TI, dy_TO = x_TI.double().cpu(), dy_TO.double().cpu()
    g_sq_E = torch.zeros(num_groups, dtype=torch.float64)
    g_total_OI = torch.zeros(dy_TO.shape[-1], x_TI.shape[-1], dtype=torch.float64)
    b_total_O = torch.zeros(dy_TO.shape[-1], dtype=torch.float64)
    for e in range(num_groups):
        mask = group_T == e
        if not bool(mask.any()):
            continue
        g_OI = dy_TO[mask].t() @ x_TI[mask]
        b_O = dy_TO[mask].sum(0)
        g_sq_E[e] = g_OI.pow(2).sum() + b_O.pow(2).sum()
        g_total_OI += g_OI
        b_total_O += b_O
    return g_sq_E, g_total_OI.pow(2).sum() + b_total_O.pow(2).sum()
