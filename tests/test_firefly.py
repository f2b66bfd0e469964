"""Firefly (first-order Taylor) layer selection picks the layer whose token groups disagree.

The planted model: tokens come in two clusters (±μ) whose targets need opposite output changes.
Every block's fc2 starts at zero, so each block sees the same input and the same output gradient.
Ordinary blocks' hidden units fire only for one cluster: their gradient is large but every token group
wants the same update, so splitting them buys nothing. The planted block's hidden units are the same
for both clusters: its total gradient nearly cancels, yet each group wants a large, opposite update,
which only experts can deliver. Firefly must pick it; plain gradient magnitude would not.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

import rmoe

DIM, HIDDEN, DEPTH, PLANTED = 8, 32, 4, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp(DIM, HIDDEN)


class PlantedModel(nn.Module):
    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.head = nn.Linear(DIM, 1, bias=False)
        direction = mu / mu.norm()
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                fc1, fc2 = block.mlp.fc1, block.mlp.fc2
                fc2.weight.zero_()
                fc2.bias.zero_()
                if i == PLANTED:
                    fc1.weight.zero_()
                    fc1.bias.fill_(1.0)
                else:
                    fc1.weight.copy_(3.0 * direction.expand(HIDDEN, DIM))
                    fc1.bias.zero_()
            head = torch.randn(DIM)
            head -= (head @ direction) * direction  # orthogonal to the clusters: predictions start at ~0
            self.head.weight.copy_(head.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block.mlp(x)
        return self.head(x).squeeze(-1)


def planted_case() -> tuple[PlantedModel, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -1.0, 2.0, 0.5, -0.5, 1.5, -2.0, 0.0])
    sign = torch.where(torch.rand(4, 64) < 0.5, 1.0, -1.0)
    x = sign.unsqueeze(-1) * mu + 0.05 * torch.randn(4, 64, DIM)
    return PlantedModel(mu), (x, sign)


def mse(model: nn.Module, batch: object) -> torch.Tensor:
    x, y = batch  # type: ignore[misc]
    return (model(x) - y).pow(2).mean()


def test_firefly_picks_the_planted_layer() -> None:
    model, batch = planted_case()
    scores = rmoe.firefly_scores(model, batch, mse, num_experts=4)
    assert len(scores) == DEPTH and all(s >= -1e-9 for s in scores)
    assert max(range(DEPTH), key=scores.__getitem__) == PLANTED
    others = [s for i, s in enumerate(scores) if i != PLANTED]
    assert scores[PLANTED] > 3 * max(others)
    assert rmoe.select_firefly(model, 1, batch, mse, num_experts=4) == [PLANTED]


def test_plain_gradient_magnitude_would_pick_another_layer() -> None:
    model, batch = planted_case()
    mse(model, batch).backward()
    grad_norm = [float(block.mlp.fc2.weight.grad.norm()) for block in model.blocks]
    assert max(range(DEPTH), key=grad_norm.__getitem__) != PLANTED


def test_scores_leave_parameter_gradients_untouched() -> None:
    model, batch = planted_case()
    rmoe.firefly_scores(model, batch, mse, num_experts=4)
    assert all(p.grad is None for p in model.parameters())


def test_firefly_runs_on_a_real_vit() -> None:
    import timm

    model = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def loss_fn(m: nn.Module, batch: object) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])  # type: ignore[index]

    layers = rmoe.select_firefly(model, 2, (images, labels), loss_fn, num_experts=4)
    assert len(layers) == 2 and all(0 <= i < 6 for i in layers)
