"""AdamW with per-group learning rates (router, residual, rest) and a warmup + decay schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from rmoe.moe import parameter_role
from rmoe_platform.config.stage import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by LR group and by weight decay (none on biases, norms, embeddings)."""
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = parameter_role(name)
        kind = role if role in ("router", "residual") else "base"
        decay = param.ndim >= 2 and name not in no_decay_names and not name.endswith("pos_embed")
        groups.setdefault((kind, decay), []).append(param)
    lrs = {"router": cfg.router_lr or cfg.lr, "residual": cfg.residual_lr or cfg.lr, "base": cfg.lr}
    return [
        {"params": params, "lr": lrs[kind], "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{kind}"}
        for (kind, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, milestone_steps: tuple[int, ...] = ()
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup times the decay of `cfg.schedule`, as one LambdaLR (see `OptimConfig`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps, milestone_steps))


def lr_factor(cfg: OptimConfig, total_steps: int, milestone_steps: tuple[int, ...] = ()) -> Callable[[int], float]:
    """The learning rate at `step` ÷ the base learning rate, in closed form."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def warmup_factor(step: int) -> float:
        if step >= warmup:
            return 1.0
        start = cfg.warmup_start_factor
        if start is None:
            return (step + 1) / warmup
        return start + (1 - start) * step / max(warmup - 1, 1)  # mmengine's LinearLR reaches 1 at its last step

    def decay(step: int) -> float:
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestone_steps)
        if step < warmup:
            return 1.0
        if cfg.schedule == "poly":
            span = max(1, total_steps - warmup - 1)  # mmengine's PolyLR reaches the floor at the last step
            return floor + (1 - floor) * (1 - min(step - warmup, span) / span) ** cfg.power
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return lambda step: warmup_factor(step) * decay(step)
