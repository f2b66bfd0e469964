"""Library demo: dense ViT → Firefly layer selection → RMoE upcycling → residual training → checkpoint.

Runs on CPU in about a minute: `python -m rmoe.demo` (the README's `make demo`).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import timm
import torch
from torch import nn

import rmoe
from rmoe.synthetic import make_gratings

ARCH = "rmoe_vit_nano_patch4_32"


def cross_entropy(model: nn.Module, batch: object) -> torch.Tensor:
    images, labels = batch  # type: ignore[misc]
    return nn.functional.cross_entropy(model(images), labels)


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float, batch: int = 64) -> float:
    """AdamW on the parameters that require grad, task loss + MoE aux loss; returns the last loss."""
    images, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=generator)
        logits, aux = rmoe.forward_with_aux(model, images[idx])
        loss = nn.functional.cross_entropy(logits, labels[idx]) + aux.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    images, labels = data
    correct = sum(
        int((model(x).argmax(-1) == y).sum()) for x, y in zip(images.split(256), labels.split(256), strict=True)
    )
    return correct / len(labels)


def train_only(model: nn.Module, name_parts: Iterable[str]) -> int:
    """Freeze everything except parameters whose name contains one of `name_parts`; returns the count."""
    parts = tuple(name_parts)
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in parts))
        count += p.numel() if p.requires_grad else 0
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dense-steps", type=int, default=150)
    parser.add_argument("--residual-steps", type=int, default=100)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="where to keep the RMoE checkpoint")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    classes, noise = 16, 1.0
    train_set = make_gratings(4096, classes, noise=noise, seed=0)
    val_set = make_gratings(1024, classes, noise=noise, seed=1)

    dense = timm.create_model(ARCH, num_experts=0, num_classes=classes)
    train(dense, train_set, args.dense_steps, lr=2e-3)
    dense_acc = accuracy(dense, val_set)
    print(f"dense upstream   : val acc {dense_acc:.3f} after {args.dense_steps} steps")

    calibration = (train_set[0][:64], train_set[1][:64])
    scores = rmoe.firefly_scores(dense, calibration, cross_entropy, num_experts=args.experts)
    layers = rmoe.select_firefly(dense, 2, calibration, cross_entropy, num_experts=args.experts)
    print(f"firefly scores   : {[round(s, 4) for s in scores]} → MoE layers {layers}")

    model = copy.deepcopy(dense)
    config = rmoe.MoEConfig(num_experts=args.experts, top_k=1, init_noise=0.01, freeze_core=True)
    rmoe.upcycle(model, layers, config)  # the copy of the dense model carries its spec: the MoE is recorded
    upcycled_acc = accuracy(model, val_set)
    trainable = train_only(model, ("router.", ".res_"))
    train(model, train_set, args.residual_steps, lr=1e-3)
    rmoe_acc = accuracy(model, val_set)
    print(f"RMoE upcycled    : val acc {upcycled_acc:.3f} (alignment keeps the dense function)")
    print(
        f"RMoE residual    : val acc {rmoe_acc:.3f} after {args.residual_steps} steps, {trainable:,} trainable params"
    )

    _, aux = rmoe.forward_with_aux(model.eval(), val_set[0][:256])
    for name, layer_aux in aux.layers.items():
        load = layer_aux.tokens_per_expert.tolist()
        print(f"  {name}: tokens/expert {load}, router entropy {float(layer_aux.router_entropy):.3f}")
    for name, ratios in rmoe.residual_norm_ratios(model).items():
        print(f"  {name}: ‖θʳ‖/‖θ⁰‖ per expert {[round(r, 4) for r in ratios]}")

    with tempfile.TemporaryDirectory() as tmp:
        path = rmoe.save_model(model, (args.out or Path(tmp)) / "rmoe_demo.safetensors")
        reloaded = rmoe.load_model(path).eval()
        same = torch.equal(reloaded(val_set[0][:8]), model(val_set[0][:8]))
        print(f"checkpoint       : {path.name} reloads with identical outputs: {same}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
