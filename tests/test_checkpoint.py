"""safetensors checkpoints: round trips, embedded specs, clear errors on mismatch."""

from __future__ import annotations

import pytest
import timm
import torch

import rmoe
from rmoe import ModelSpec, MoEConfig


def test_round_trip_rebuilds_the_same_model(tmp_path) -> None:
    model = timm.create_model("rmoe_swin_nano_patch4_window4_64", num_experts=4, top_k=2, residual_rank=8).eval()
    path = rmoe.save_model(model, tmp_path / "ckpt" / "model.safetensors", metadata={"step": "7"})
    loaded = rmoe.load_model(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert rmoe.spec_of(loaded) == rmoe.spec_of(model)
    assert rmoe.checkpoint.read_metadata(path)["step"] == "7"
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"], "no temp files left behind"


def test_frozen_core_flags_survive_reload(tmp_path) -> None:
    model = rmoe.build_model(ModelSpec("rmoe_vit_nano_patch4_32", moe_layers=(1,), moe=MoEConfig(num_experts=2)))
    loaded = rmoe.load_model(rmoe.save_model(model, tmp_path / "m.safetensors"))
    core = [p for n, p in loaded.named_parameters() if ".core_" in n]
    assert core and not any(p.requires_grad for p in core)


def test_mismatched_checkpoint_names_what_differs(tmp_path) -> None:
    small = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=4)
    path = rmoe.save_model(small, tmp_path / "small.safetensors")
    other = ModelSpec("rmoe_vit_nano_patch4_32", moe_layers=(1, 3, 5), moe=MoEConfig(num_experts=8))
    with pytest.raises(ValueError, match=r"mismatched checkpoint.*shape mismatch"):
        rmoe.load_model(path, spec=other)
    dense = ModelSpec("rmoe_vit_nano_patch4_32")
    with pytest.raises(ValueError, match="unexpected"):
        rmoe.load_model(path, spec=dense)


def test_missing_file_and_missing_spec_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        rmoe.load_state_dict_file(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="rmoe_spec"):
        rmoe.load_model(tmp_path / "bare.safetensors")


def test_spec_json_round_trip_and_validation() -> None:
    spec = ModelSpec("rmoe_vit_nano_patch4_32", {"num_classes": 3}, (1, 3), MoEConfig(num_experts=4, top_k=2))
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="arch"):
        ModelSpec("no_such_model_anywhere")
    with pytest.raises(ValueError, match="unknown model spec field"):
        ModelSpec.from_dict({"arch": "rmoe_vit_nano_patch4_32", "experts": 3})
    with pytest.raises(ValueError, match="unknown MoE config field"):
        MoEConfig.from_dict({"num_experts": 2, "topk": 1})
