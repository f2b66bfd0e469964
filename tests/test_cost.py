"""The analytic cost model against torch's FlopCounterMode on the real models.

ViT attention runs through SDPA, whose CPU flash kernel FlopCounterMode does not count; the counts
here force SDPA's math backend so attention decomposes into the counted bmm's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from timm.models import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import rmoe
from rmoe.cost import CostBreakdown, flops_per_image, training_flops

VIT = "rmoe_vit_nano_patch4_32"
SWIN = "rmoe_swin_nano_patch4_window4_64"
BATCH = 4
EXACT = 1e-9  # the analytic count matches the counted one exactly on the loop backend


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models are tiny: threads gain nothing, and spin-waiting ones crawl on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _residual_only(model: nn.Module) -> None:
    """The RMoE residual stage: only routers and residuals train."""
    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name or ".res_" in name)


SETTINGS: dict[str, tuple[dict, Callable[[nn.Module], None] | None]] = {
    "moe": (dict(residual=False), None),
    "rmoe_full_frozen_core": (dict(residual=True, freeze_core=True), None),
    "rmoe_rank8_frozen_core": (dict(residual_rank=8, freeze_core=True), None),
    "rmoe_full_trainable_core": (dict(residual=True, freeze_core=False), None),
    "rmoe_rank8_trainable_core": (dict(residual_rank=8, freeze_core=False), None),
    "rmoe_full_residual_only": (dict(residual=True), _residual_only),
    "rmoe_rank8_residual_only": (dict(residual_rank=8), _residual_only),
}


def _moe(arch: str, top_k: int = 2, **kwargs) -> nn.Module:
    kwargs = {"expert_backend": "loop", **kwargs}
    return timm.create_model(arch, num_experts=4, top_k=top_k, moe_layers="every_other", **kwargs)


def counted_flops(model: nn.Module, batch_size: int = BATCH, backward: bool = True) -> tuple[float, float]:
    """FlopCounterMode's (forward, forward + backward) FLOPs per image on a random batch."""
    x = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        out = model(x)
        forward = counter.get_total_flops()
        if backward:
            out.float().pow(2).mean().backward()
    return forward / batch_size, counter.get_total_flops() / batch_size


def assert_matches(analytic: CostBreakdown, counted: tuple[float, float], rel: float = EXACT) -> None:
    forward, total = counted
    assert analytic.forward == pytest.approx(forward, rel=rel)
    assert analytic.total == pytest.approx(total, rel=rel)


@pytest.mark.parametrize("arch", [VIT, SWIN])
def test_dense_matches_flop_counter(arch: str) -> None:
    model = timm.create_model(arch, num_experts=0)
    cost = flops_per_image(model)
    assert_matches(cost, counted_flops(model))
    assert not any(name.startswith(("router", "experts")) for name in cost.per_component)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", [VIT, SWIN])
def test_moe_matches_flop_counter(arch: str, setting: str, top_k: int) -> None:
    kwargs, prepare = SETTINGS[setting]
    model = _moe(arch, top_k, **kwargs)
    if prepare is not None:
        prepare(model)
    cost = flops_per_image(model)
    assert_matches(cost, counted_flops(model))
    assert sum(cost.per_component.values()) == pytest.approx(cost.total)
    assert training_flops(model, 10) == pytest.approx(10 * cost.total)


@pytest.mark.parametrize("arch", [VIT, SWIN])
def test_head_only_backward_is_the_head_weight_gradient(arch: str) -> None:
    model = timm.create_model(arch, num_experts=0)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head"))
    cost = flops_per_image(model)
    assert_matches(cost, counted_flops(model))
    assert cost.backward == pytest.approx(cost.per_component["head"] / 2)


@pytest.mark.parametrize(
    ("arch", "trainable"),
    [
        (VIT, "pos_embed"),  # every input gradient, no weight gradient
        (VIT, "blocks.2.norm2.weight"),  # gradients start mid-network, inside a block
        (SWIN, "layers.1.blocks.1.attn.relative_position_bias_table"),  # attention backward via the bias only
        (SWIN, "layers.2.downsample.norm.bias"),
    ],
)
def test_gradient_flow_from_one_trainable_parameter(arch: str, trainable: str) -> None:
    model = _moe(arch, residual_rank=8)
    for name, param in model.named_parameters():
        param.requires_grad_(name == trainable)
    assert_matches(flops_per_image(model), counted_flops(model))


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("rmoe_vit_tiny_patch16_224", dict(num_experts=4, top_k=2, expert_backend="loop", residual_rank=8)),
        ("swin_tiny_patch4_window7_224", {}),  # a plain timm model, costed the same way
    ],
)
def test_224_forward_matches_flop_counter(arch: str, kwargs: dict) -> None:
    model = timm.create_model(arch, **kwargs)
    forward, _ = counted_flops(model, batch_size=1, backward=False)
    assert flops_per_image(model).forward == pytest.approx(forward, rel=EXACT)


def test_swin_padded_windows_match_flop_counter() -> None:
    """48 px: stage grids 12, 6, 3, 2, so windows are zero-padded and patch merging pads an odd grid."""
    model = _moe(SWIN, img_size=48)
    assert_matches(flops_per_image(model), counted_flops(model))


def test_experts_cost_active_experts_only() -> None:
    """An MoE layer adds the router and (top_k − 1) more MLPs per token over the dense model."""
    top_k, E = 2, 4
    dense = flops_per_image(timm.create_model(VIT, num_experts=0)).forward
    moe_model = _moe(VIT, top_k, residual=False)
    tokens, D, H = 8 * 8 + 1, 128, 512
    extra = len(rmoe.moe_layers(moe_model)) * (2 * tokens * D * E + (top_k - 1) * 4 * tokens * D * H)
    assert flops_per_image(moe_model).forward == pytest.approx(dense + extra, rel=EXACT)


@pytest.mark.parametrize("arch", [VIT, SWIN])
def test_padded_backend_counts_at_least_the_active_experts(arch: str) -> None:
    model = _moe(arch, expert_backend="padded")
    cost = flops_per_image(model)
    forward, total = counted_flops(model)
    assert forward >= cost.forward
    assert total >= cost.total


@pytest.mark.parametrize("arch", [VIT, SWIN])
def test_capacity_bounds_the_expert_rows(arch: str) -> None:
    # factor 0.25: every expert overflows, so the bound min(k·T, E·C) is what runs
    tight = _moe(arch, capacity_factor=0.25)
    assert_matches(flops_per_image(tight, batch_size=BATCH), counted_flops(tight))
    assert flops_per_image(tight, batch_size=BATCH).forward < flops_per_image(_moe(arch)).forward
    # factor 1.0: drops depend on the routing; the analytic count is an upper bound
    loose = _moe(arch, capacity_factor=1.0)
    forward, total = counted_flops(loose)
    cost = flops_per_image(loose, batch_size=BATCH)
    assert cost.forward >= forward
    assert cost.total >= total


def test_frozen_core_saves_backward_only_with_low_rank_residuals() -> None:
    """A frozen core skips its weight gradients when it runs as its own GEMM (low rank); full-rank
    residual experts run merged weights whose gradient is computed anyway."""
    moe = flops_per_image(_moe(VIT, residual=False))
    full = flops_per_image(_moe(VIT, residual=True, freeze_core=True))
    low_rank = flops_per_image(_moe(VIT, residual_rank=8, freeze_core=True))
    residual_only = _moe(VIT, residual_rank=8)
    _residual_only(residual_only)
    assert full.backward == pytest.approx(moe.backward)
    assert low_rank.backward < moe.backward
    assert flops_per_image(residual_only).backward < low_rank.backward


def test_unsupported_models_raise() -> None:
    with pytest.raises(ValueError, match="unsupported model type Linear"):
        flops_per_image(nn.Linear(4, 4))
    vit_map = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="map")
    with pytest.raises(ValueError, match="attention pooling"):
        flops_per_image(vit_map)
    gated = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    gated.blocks[0].attn.gate = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"unknown parameters: blocks\.0\.attn\.gate\.weight"):
        flops_per_image(gated)
