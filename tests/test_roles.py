"""Parameter roles (router, core, residual, expert) come from one function, `rmoe.moe.parameter_role`: the
trainable groups, the optimizer's groups and the dashboard's torch-free checkpoint reader all use it."""

from __future__ import annotations

import pytest
import timm
from torch import nn

import rmoe
from dashboard import checkpoints
from rmoe.moe import ROLES, MoEConfig, moe_parameter, parameter_role
from rmoe_platform.config.stage import OptimConfig
from rmoe_platform.stage.worker.optim import param_groups
from rmoe_platform.stage.worker.trainable import group_members

CONFIGS = {
    "residual": MoEConfig(num_experts=2),
    "low_rank": MoEConfig(num_experts=2, residual_rank=2),
    "plain": MoEConfig(num_experts=2, residual=False),
}


def model_with(config: MoEConfig) -> nn.Module:
    model = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=0)
    rmoe.upcycle(model, [1, 3], config)
    return model


def roles_from_modules(model: nn.Module) -> dict[str, str]:
    """What each MoE parameter is, from the module tree itself (the ground truth the names must match)."""
    out = {}
    for layer_name, layer in rmoe.moe_layers(model):
        for name, _ in layer.router.named_parameters():
            out[f"{layer_name}.router.{name}"] = "router"
        for name, _ in layer.experts.named_parameters(recurse=False):
            out[f"{layer_name}.experts.{name}"] = (
                "core" if name.startswith("core_") else "residual" if name.startswith("res_") else "expert"
            )
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_roles_match_the_module_tree_and_the_dashboard_reader(kind: str) -> None:
    model = model_with(CONFIGS[kind])
    truth = roles_from_modules(model)
    for name, _ in model.named_parameters():
        assert parameter_role(name) == truth.get(name), name
        ours, theirs = moe_parameter(name), checkpoints.roles.moe_parameter(name)
        assert (ours and (ours.layer, ours.role, ours.tensor)) == (
            theirs and (theirs.layer, theirs.role, theirs.tensor)
        )
    assert set(truth.values()) <= set(ROLES)
    expected = {"residual": {"router", "core", "residual"}, "low_rank": {"router", "core", "residual"}}
    assert set(truth.values()) == expected.get(kind, {"router", "expert"})


def test_groups_and_optimizer_follow_the_roles() -> None:
    model = model_with(CONFIGS["residual"])
    names = [n for n, _ in model.named_parameters()]
    assert group_members(model, "router") == {n for n in names if parameter_role(n) == "router"} != set()
    assert group_members(model, "residual") == {n for n in names if parameter_role(n) == "residual"} != set()
    assert group_members(model, "core") == {n for n in names if parameter_role(n) == "core"} != set()
    assert group_members(model, "experts") == group_members(model, "core") | group_members(model, "residual")
    lrs = {g["name"]: g["lr"] for g in param_groups(model, OptimConfig(lr=1.0, router_lr=0.5, residual_lr=0.25))}
    assert lrs == {"base": 1.0, "router": 0.5, "residual": 0.25}
    by_group = {id(p): g["name"] for g in param_groups(model, OptimConfig()) for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the frozen core is in no optimizer group
            assert parameter_role(name) == "core"
            continue
        assert by_group[id(param)] == {"router": "router", "residual": "residual"}.get(parameter_role(name), "base")


def test_dashboard_reader_takes_only_expert_weights() -> None:
    model = model_with(CONFIGS["low_rank"])
    taken = {n for n, _ in model.named_parameters() if checkpoints.expert_weight(n) is not None}
    biases = ("b1", "b2")
    weights = {n for n in roles_from_modules(model) if not set(n.rsplit(".", 1)[-1].split("_")) & set(biases)}
    assert taken == {n for n in weights if parameter_role(n) != "router"} != set()
