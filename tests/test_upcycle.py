"""Dense → MoE upcycling preserves the function (ViT and Swin), from models and from checkpoint files."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import rmoe
from rmoe import ModelSpec, MoEConfig, build_model

ARCHS = {"vit": ("rmoe_vit_nano_patch4_32", 32), "swin": ("rmoe_swin_nano_patch4_window4_64", 64)}


def dense_model(family: str) -> torch.nn.Module:
    arch, _ = ARCHS[family]
    return timm.create_model(arch, num_experts=0).eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize(("top_k", "rank"), [(1, None), (2, None), (1, 8), (2, 8)])
def test_zero_noise_aligned_upcycling_preserves_outputs(family, top_k, rank) -> None:
    model = dense_model(family)
    x = torch.randn(2, 3, ARCHS[family][1], ARCHS[family][1])
    with torch.no_grad():
        before = model(x)
    layers = rmoe.resolve_layers("all", len(rmoe.find_mlp_layers(model)))
    rmoe.upcycle(model, layers, MoEConfig(num_experts=4, top_k=top_k, init_noise=0.0, residual_rank=rank))
    assert len(rmoe.moe_layers(model)) == len(layers)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_sparse_upcycling_copies_also_preserve_outputs(family) -> None:
    model = dense_model(family)
    x = torch.randn(2, 3, ARCHS[family][1], ARCHS[family][1])
    with torch.no_grad():
        before = model(x)
    rmoe.upcycle(model, [0, 1], MoEConfig(num_experts=4, top_k=2, init_noise=0.0, residual=False))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_noise_moves_the_function_a_little() -> None:
    model = dense_model("vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        rmoe.upcycle(model, [1, 3], MoEConfig(num_experts=4, init_noise=0.05))
        delta = (model(x) - before).abs().max()
    assert 0 < delta < 0.1 * before.abs().max()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_upcycle_from_dense_checkpoint_file(tmp_path, suffix) -> None:
    dense = dense_model("vit")
    path = tmp_path / f"dense{suffix}"
    if suffix == ".safetensors":
        rmoe.save_model(dense, path)
        spec = None
    else:
        torch.save(dense.state_dict(), path)
        spec = ModelSpec("rmoe_vit_nano_patch4_32")
    config = MoEConfig(num_experts=4, init_noise=0.0)
    model = rmoe.upcycle_checkpoint(path, [1, 3, 5], config, spec=spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert rmoe.spec_of(model).moe_layers == (1, 3, 5)


def test_upcycle_plain_timm_vit() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        rmoe.upcycle(model, [0, 1], MoEConfig(num_experts=2, init_noise=0.0))
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_unknown_layer_index_names_the_argument() -> None:
    with pytest.raises(ValueError, match="moe_layers: unknown layer index 6"):
        rmoe.upcycle(dense_model("vit"), [6], MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="moe_layers"):
        timm.create_model("rmoe_vit_nano_patch4_32", num_experts=2, moe_layers=[0, 99])


def test_converting_an_moe_layer_twice_is_rejected() -> None:
    model = dense_model("vit")
    rmoe.upcycle(model, [1], MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="already an MoE layer"):
        rmoe.upcycle(model, [1], MoEConfig(num_experts=2))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("every_other", [1, 3, 5]), ("last_2", [4, 5]), ("all", [0, 1, 2, 3, 4, 5]), ("none", []), ("0,2", [0, 2])],
)
def test_static_layer_selection(spec, expected) -> None:
    assert rmoe.resolve_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["last_0", "last_9", "sometimes", "firefly"])
def test_bad_layer_selection_is_rejected(spec) -> None:
    with pytest.raises(ValueError, match="moe_layers"):
        rmoe.resolve_layers(spec, 6)


def test_merge_for_export_keeps_outputs_and_drops_the_core() -> None:
    spec = ModelSpec("rmoe_vit_nano_patch4_32", moe_layers=(1, 3), moe=MoEConfig(num_experts=4, residual_rank=4))
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        rmoe.merge_residual_experts(model)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not any("core_" in name for name in model.state_dict())


def test_upcycling_is_determined_by_its_seed() -> None:
    config = MoEConfig(num_experts=4, init_noise=0.05, residual_rank=4)
    dense = dense_model("vit")
    states = []
    for _ in range(2):
        model = copy.deepcopy(dense)
        torch.manual_seed(len(states) + 123)  # the global RNG must not matter
        rmoe.upcycle(model, [1, 3], config, seed=7)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---- the spec follows the conversion (one call) ---------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_conversion_records_the_spec_that_rebuilds_the_model(family) -> None:
    model = dense_model(family)
    dense_spec = rmoe.spec_of(model)
    config = MoEConfig(num_experts=2, init_noise=0.05, residual_rank=4)
    names = rmoe.upcycle(model, "every_other", config, seed=3)
    spec = rmoe.spec_of(model)
    layers = tuple(rmoe.resolve_layers("every_other", len(rmoe.find_mlp_layers(model))))
    assert spec == dense_spec.with_moe(layers, config) and len(names) == len(layers)
    rebuilt = build_model(ModelSpec.from_json(spec.to_json()))
    rmoe.load_weights(rebuilt, model.state_dict())  # strict: the spec rebuilds the exact module tree


def test_a_second_conversion_with_another_config_is_refused_and_leaves_the_model() -> None:
    model = dense_model("vit")
    rmoe.upcycle(model, [1], MoEConfig(num_experts=2))
    rmoe.upcycle(model, [3], MoEConfig(num_experts=2))  # the same config: the spec holds both layers
    assert rmoe.spec_of(model).moe_layers == (1, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="another MoE config"):
        rmoe.upcycle(model, [5], MoEConfig(num_experts=4))
    with pytest.raises(ValueError, match="unknown layer index 9"):
        rmoe.upcycle(model, [0, 9], MoEConfig(num_experts=2))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert rmoe.spec_of(model).moe_layers == (1, 3)


def test_spec_with_kwargs_changes_only_the_kwargs() -> None:
    spec = ModelSpec("rmoe_vit_nano_patch4_32", {"num_classes": 10}, (1,), MoEConfig(num_experts=2))
    changed = spec.with_kwargs(num_classes=3, img_size=64)
    assert changed.model_kwargs == {"num_classes": 3, "img_size": 64}
    assert (changed.arch, changed.moe_layers, changed.moe) == (spec.arch, spec.moe_layers, spec.moe)
    assert spec.model_kwargs == {"num_classes": 10}
