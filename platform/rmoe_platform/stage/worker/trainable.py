"""Trainable sets: which parameters a stage trains, by named group (residual-only, router, head, …)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from rmoe.moe import parameter_role
from rmoe.upcycle import moe_layers


def _moe_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, _ in moe_layers(model))


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """What `head` names: a timm classifier ("head" for a ViT, "head.fc" for a Swin), or everything of an
    mm model but its backbone (UperNet's decode and auxiliary heads; Mask R-CNN's FPN, RPN and RoI heads)."""
    mm_heads = getattr(model, "rmoe_head_prefixes", None)
    if mm_heads is not None:
        return tuple(mm_heads)
    return (f"{getattr(model, 'default_cfg', {}).get('classifier', 'head')}.",)


def group_members(model: nn.Module, group: str) -> set[str]:
    """Parameter names in `group`: all, residual, router, experts, core, moe, head, non_moe, re:<regex>.
    Roles inside MoE layers (router, core, residual, expert) are `rmoe.moe.parameter_role`'s."""
    names = [name for name, _ in model.named_parameters()]
    moe = _moe_prefixes(model)
    in_moe = {n for n in names if n.startswith(moe)} if moe else set()
    if group == "all":
        return set(names)
    if group in ("residual", "router", "core"):
        return {n for n in in_moe if parameter_role(n) == group}
    if group == "experts":
        return {n for n in in_moe if parameter_role(n) in ("core", "residual", "expert")}
    if group == "moe":
        return in_moe
    if group == "head":
        return {n for n in names if n.startswith(_head_prefixes(model))}
    if group == "non_moe":
        return set(names) - in_moe
    if group.startswith("re:"):
        pattern = re.compile(group[3:])
        return {n for n in names if pattern.search(n)}
    raise ValueError(f"trainable: unknown group {group!r}")


def apply_trainable(model: nn.Module, groups: Sequence[str], *, freeze_core: bool = True) -> int:
    """Set requires_grad from the union of `groups`; returns the number of trainable parameters.

    A frozen core (the MoE config's `freeze_core`) stays frozen unless 'core' is named explicitly.
    Every group must select at least one parameter: a group that names nothing is a config error.
    """
    selected: set[str] = set()
    for group in groups:
        members = group_members(model, group)
        if not members:
            raise ValueError(f"trainable: group {group!r} selects no parameter of this model")
        selected |= members
    if freeze_core and "core" not in groups:
        selected -= group_members(model, "core")
    if not selected:
        raise ValueError(f"trainable: {list(groups)} leaves no parameter to train")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
        count += param.numel() if name in selected else 0
    return count
