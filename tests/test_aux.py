"""Auxiliary losses and capacity on crafted routings."""

from __future__ import annotations

import math

import pytest
import torch

from rmoe.moe import expert_capacity, importance_cv2_loss, router_entropy, router_z_loss, switch_load_balance_loss
from rmoe.moe.routing import capacity_keep_mask

E, T = 4, 16


def uniform() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.full((T, E), 1.0 / E)
    idx = torch.arange(T).remainder(E).unsqueeze(1)  # each expert gets T/E tokens
    return probs, idx


def collapsed() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.zeros(T, E)
    probs[:, 0] = 1.0
    return probs, torch.zeros(T, 1, dtype=torch.long)


def test_uniform_routing_is_balanced() -> None:
    probs, idx = uniform()
    assert float(importance_cv2_loss(probs)) == pytest.approx(0.0, abs=1e-12)
    assert float(switch_load_balance_loss(probs, idx)) == pytest.approx(1.0)  # the Switch loss's minimum
    assert float(router_entropy(probs)) == pytest.approx(math.log(E))
    assert float(router_z_loss(torch.zeros(T, E))) == pytest.approx(math.log(E) ** 2)


def test_collapsed_routing_is_maximally_penalised() -> None:
    probs, idx = collapsed()
    assert float(importance_cv2_loss(probs)) == pytest.approx(E - 1)  # population CV² of (T, 0, …, 0)
    assert float(switch_load_balance_loss(probs, idx)) == pytest.approx(E)
    assert float(router_entropy(probs)) == pytest.approx(0.0, abs=1e-6)


def test_importance_loss_gradient_pushes_towards_balance() -> None:
    logits = torch.zeros(T, E)
    logits[:, 0] = 2.0
    logits.requires_grad_(True)
    importance_cv2_loss(torch.softmax(logits, -1)).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, 0] > 0) and torch.all(logits.grad[:, 1:] < 0)


def test_capacity_serves_first_choices_before_second_choices() -> None:
    # every token picks expert 0 first and expert 1 second; capacity 3 per expert
    idx = torch.tensor([[0, 1]] * 5)
    kept = capacity_keep_mask(idx, None, num_experts=2, capacity=3)
    assert kept[:, 0].tolist() == [True, True, True, False, False]
    assert kept[:, 1].tolist() == [True, True, True, False, False]


def test_batch_prioritised_capacity_keeps_high_priority_tokens() -> None:
    idx = torch.zeros(5, 1, dtype=torch.long)
    priority = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2])
    kept = capacity_keep_mask(idx, priority, num_experts=2, capacity=2)
    assert kept[:, 0].tolist() == [False, True, False, True, False]


def test_expert_capacity_formula() -> None:
    assert expert_capacity(100, 8, 2, 1.0) == 25
    assert expert_capacity(100, 8, 1, 1.25) == 16
    assert expert_capacity(1, 8, 1, 0.01) == 1
