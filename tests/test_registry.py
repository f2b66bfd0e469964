"""Every registered `rmoe_*` model builds through timm, runs forward and backward, and reports aux."""

from __future__ import annotations

import pytest
import timm
import torch

import rmoe
from rmoe import MoEConfig

MODELS = timm.list_models("rmoe_*")
LARGE = {"rmoe_vit_base_patch16_224", "rmoe_swin_tiny_patch4_window7_224", "rmoe_vit_small_patch16_224"}


def test_registry_has_vit_and_swin_in_demo_and_paper_sizes() -> None:
    assert {
        "rmoe_vit_nano_patch4_32",
        "rmoe_vit_tiny_patch16_224",
        "rmoe_swin_nano_patch4_window4_64",
        "rmoe_swin_tiny_patch4_window7_224",
    } <= set(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in MODELS])
def test_forward_backward(name: str) -> None:
    model = timm.create_model(name, num_experts=4, top_k=2)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    out, aux = rmoe.forward_with_aux(model, x)
    assert out.shape == (1, model.num_classes)
    assert aux.layers and torch.isfinite(aux.loss)
    (out.sum() + aux.loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    frozen_core = [n for n, p in model.named_parameters() if ".core_" in n]
    assert frozen_core and all(p.grad is None for n, p in model.named_parameters() if ".core_" in n)
    telemetry = aux.telemetry()
    assert any(key.endswith("router_entropy") for key in telemetry)


def test_dense_variant_has_no_experts_and_every_other_default() -> None:
    assert rmoe.moe_layers(timm.create_model("rmoe_vit_nano_patch4_32", num_experts=0)) == []
    moe = timm.create_model("rmoe_vit_nano_patch4_32")
    assert [name for name, _ in rmoe.moe_layers(moe)] == ["blocks.1.mlp", "blocks.3.mlp", "blocks.5.mlp"]
    assert rmoe.spec_of(moe).moe == MoEConfig(num_experts=8)


def test_moe_kwargs_flow_into_the_config() -> None:
    model = timm.create_model(
        "rmoe_swin_nano_patch4_window4_64",
        num_experts=4,
        top_k=2,
        capacity_factor=1.25,
        residual_rank=8,
        moe_layers="last_2",
    )
    spec = rmoe.spec_of(model)
    assert spec.moe_layers == (6, 7)
    assert spec.moe is not None and (spec.moe.top_k, spec.moe.capacity_factor, spec.moe.residual_rank) == (2, 1.25, 8)


def test_pretrained_is_refused_without_network() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("rmoe_vit_nano_patch4_32", pretrained=True)


def test_moe_options_on_a_dense_model_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_experts=0"):
        timm.create_model("rmoe_vit_nano_patch4_32", num_experts=0, top_k=2)


def test_top_k_above_num_experts_is_rejected_at_creation() -> None:
    with pytest.raises(ValueError, match="top_k"):
        timm.create_model("rmoe_vit_nano_patch4_32", num_experts=2, top_k=3)


@pytest.mark.parametrize(("name", "size"), [("rmoe_vit_nano_patch4_32", 32), ("rmoe_swin_nano_patch4_window4_64", 64)])
def test_feature_pyramid_is_channels_first_at_strides_4_to_32(name: str, size: int) -> None:
    backbone = rmoe.models.pyramid_backbone(timm.create_model(name, num_experts=4))
    features = backbone(torch.randn(2, 3, size, size))
    assert [f.shape[-1] for f in features] == [size // s for s in (4, 8, 16, 32)]
    assert all(f.shape[0] == 2 and f.dim() == 4 for f in features)
    assert list(backbone.strides) == [4, 8, 16, 32]


@pytest.mark.parametrize("name", ["rmoe_vit_nano_patch4_32", "rmoe_swin_nano_patch4_window4_64"])
def test_a_meta_device_build_runs_no_weight_init_and_keeps_every_shape(name: str, monkeypatch) -> None:
    """Cost projections and config checks build models on the meta device, where an init computes nothing."""
    from timm.models import VisionTransformer
    from timm.models.swin_transformer import SwinTransformer

    inits: list[str] = []
    for cls in (VisionTransformer, SwinTransformer):
        real = cls.init_weights
        monkeypatch.setattr(
            cls, "init_weights", lambda self, *a, _real=real, **k: (inits.append("init"), _real(self, *a, **k))[1]
        )
    on_cpu = timm.create_model(name, num_experts=4)
    assert inits == ["init"]
    with torch.device("meta"):
        on_meta = timm.create_model(name, num_experts=4)
    assert inits == ["init"], "no init on the meta device"
    assert {k: v.shape for k, v in on_meta.state_dict().items()} == {k: v.shape for k, v in on_cpu.state_dict().items()}
    with torch.device("meta"):
        timm.create_model(name, num_experts=4, weight_init="jax" if "vit" in name else "")
    assert inits == ["init", "init"], "a weight_init the user gives stands"
