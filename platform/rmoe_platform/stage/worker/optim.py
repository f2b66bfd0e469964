"""AdamW with per-group learning rates (router, residual, rest) and a warmup + cosine schedule."""

from __future__ import annotations

import math

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
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
