"""Mixed precision: stages train in bf16 and fp16 (CPU autocast exercises the path), the precision field
resolves and validates, and leaves the stage hashes of fp32 stages alone; optional torch.compile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml

import rmoe
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.pipelines.graph import plan_pipelines, stage_hash
from rmoe_platform.stage.run import run_stage
from rmoe_platform.stage.worker.compile import compile_dense_parts
from rmoe_platform.stage.worker.precision import Precision, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def stage_config(tmp_path: Path, precision: str, **overrides: Any) -> StageConfig:
    """A 1-worker MoE classification stage whose input pipeline is deterministic (no augmentation), so two
    precisions see the same first batch."""
    base: dict[str, Any] = {
        "name": f"p-{precision}",
        "storage": str(tmp_path / "runs"),
        "model": {"kwargs": {"depth": 2}, "moe": {"num_experts": 4, "top_k": 2}},
        "budget": {"steps": 10},
        "batch_size": 16,
        "log_every": 1,
        "precision": precision,
        "optim": {"lr": 3e-3},
        "evaluate_at_start": True,
        "checkpoint": {"every_n_steps": None, "every_n_epochs": None},
        "data": {
            "uri": str(tmp_path / "data"),
            "generate": {"num_train": 64, "num_val": 32, "num_classes": 4, "shard_rows": 32},
            "augment": {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": False},
        },
    }
    base.update(overrides)
    return StageConfig.from_dict(base)


def losses(result: Any) -> list[float]:
    return [record["loss"] for record in result.metrics["history"] if "loss" in record]


@pytest.mark.slow
def test_a_stage_trains_in_bf16_and_starts_where_fp32_does(ray_local, tmp_path: Path) -> None:
    fp32 = run_stage(stage_config(tmp_path, "fp32"))
    bf16 = run_stage(stage_config(tmp_path, "bf16"))
    assert (fp32.metrics["precision"], bf16.metrics["precision"]) == ("fp32", "bf16")
    first32, first16 = losses(fp32)[0], losses(bf16)[0]
    assert first16 == pytest.approx(first32, rel=2e-2), "the same first batch through bf16 autocast"
    assert first16 != first32, "bf16 autocast really ran (its rounding shows)"
    assert bf16.metrics["val_loss"] < bf16.metrics["initial/val_loss"], "bf16 training lowers the loss"
    assert losses(bf16)[-1] < losses(bf16)[0]


@pytest.mark.slow
def test_fp16_with_the_gradient_scaler_trains_on_two_expert_parallel_workers(ray_local, tmp_path: Path) -> None:
    """Two workers, each holding half the experts: the scaler's overflow check is all-reduced, so both
    skip or take every step together (the checkpoint's gathered experts load into one model)."""
    config = stage_config(tmp_path, "fp16", scaling={"num_workers": 2, "expert_parallel_size": 2})
    result = run_stage(config)
    assert result.metrics["precision"] == "fp16" and result.metrics["world_size"] == 2
    assert all(torch.isfinite(torch.tensor(losses(result))))
    assert result.metrics["val_loss"] < result.metrics["initial/val_loss"]
    model = rmoe.load_model(Path(result.checkpoint_uri) / "model.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters()), "checkpoints stay fp32"


def test_auto_is_bf16_on_cuda_only() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert Precision.of("fp16", torch.device("cpu")).dtype == torch.float16
    assert Precision.of("fp32", torch.device("cpu")).grad_scaler() is None
    assert isinstance(Precision.of("fp16", torch.device("cpu")).grad_scaler(), torch.amp.GradScaler)


def test_the_router_stays_fp32_and_the_weights_too_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=4, top_k=1)
    routed: list[torch.dtype] = []
    for _, layer in rmoe.moe_layers(model):
        layer.router.register_forward_hook(lambda _module, _args, routing: routed.append(routing.probs_TE.dtype))
    with Precision.of("bf16", torch.device("cpu")).autocast():
        logits, _ = rmoe.forward_with_aux(model, torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16
    assert routed and set(routed) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_precision_is_validated_and_phases_override_the_experiment() -> None:
    exp = ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", ["precision=bf16", "downstream.precision=fp32"])
    plans = plan_pipelines(exp)
    assert plans["dense"][0].config.precision == "bf16" and plans["dense"][-1].config.precision == "fp32"
    for bad, field in (("precision=fp8", "experiment"), ("upstream.precision=half", "experiment.upstream")):
        with pytest.raises(ConfigError, match=rf"{field}\.precision: unknown"):
            ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", [bad])
    with pytest.raises(ConfigError, match=r"experiment\.downstream\.compile: expected bool, got 1"):
        ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", ["downstream.compile=1"])


def test_fp32_arithmetic_keeps_its_stage_hash_and_bf16_changes_it(tmp_path: Path) -> None:
    """`auto` on CPU workers computes what every stage computed before precision existed (fp32): cached
    stages keep their hashes; bf16, GPU `auto` and compile are other computations."""
    cpu_auto = stage_config(tmp_path, "auto")
    same = {stage_hash(stage_config(tmp_path, p), None) for p in ("auto", "fp32")}
    assert same == {stage_hash(cpu_auto, None)}
    others = [
        stage_config(tmp_path, "bf16"),
        stage_config(tmp_path, "auto", scaling={"use_gpu": True}),
        stage_config(tmp_path, "auto", compile=True),
    ]
    hashes = {stage_hash(config, None) for config in others}
    assert len(hashes) == 3 and stage_hash(cpu_auto, None) not in hashes


def test_gpu_presets_say_they_train_in_auto_precision() -> None:
    presets = [*sorted((ROOT / "configs" / "paper").glob("*.yaml")), ROOT / "configs" / "k8s" / "demo_gpu.yaml"]
    for path in presets:
        assert yaml.safe_load(path.read_text()).get("precision") == "auto", path.name
        assert ExperimentConfig.load(path).precision == "auto"


@pytest.mark.slow
def test_compiled_dense_parts_compute_what_eager_does() -> None:
    torch.manual_seed(0)
    eager = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=4, top_k=1, depth=2).train()
    compiled = timm.create_model("rmoe_vit_nano_patch4_32", num_experts=4, top_k=1, depth=2).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_dense_parts(compiled) == 3, "2 attention blocks and the one dense MLP (the other is MoE)"
    x = torch.randn(4, 3, 32, 32)
    outputs, grads = [], []
    for model in (eager, compiled):
        with Precision.of("bf16", torch.device("cpu")).autocast():
            out = model(x)
        out.float().pow(2).mean().backward()
        outputs.append(out.float())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()) < 2e-2
    assert json.dumps(sorted(eager.state_dict())) == json.dumps(sorted(compiled.state_dict())), "same checkpoint"


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_prediction_trains_and_predicts_under_bf16_autocast(task: str) -> None:
    """The backbone runs in bf16; Mask R-CNN's heads get fp32 features (anchors, boxes, NMS and RoIAlign in
    fp32), UperNet's heads stay in bf16."""
    from mm_models import nano_model
    from test_mm import training_inputs

    from rmoe_platform.mm.build import mm_scope

    model = nano_model(task)
    seen: dict[str, torch.dtype] = {}

    def record(name: str, features: Any) -> None:  # a hook that returns None leaves the values alone
        seen.setdefault(name, features[0].dtype)

    model.backbone.register_forward_hook(lambda _m, _a, out: record("backbone", out))
    head = model.rpn_head.rpn_conv if task == "detection" else model.decode_head.lateral_convs[0].conv
    head.register_forward_pre_hook(lambda _m, args: record("head", args[0]))
    autocast = Precision.of("bf16", torch.device("cpu")).autocast()
    with autocast, mm_scope(task):
        data = model.data_preprocessor(training_inputs(task), True)
        losses = model.loss(data["inputs"], data["data_samples"])
    total, _ = model.parse_losses(losses)
    total.backward()
    assert torch.isfinite(total)
    assert seen == {"backbone": torch.bfloat16, "head": torch.float32 if task == "detection" else torch.bfloat16}
    model.eval()
    with torch.no_grad(), autocast, mm_scope(task):
        data = model.data_preprocessor(training_inputs(task), False)
        predictions = model.predict(data["inputs"], data["data_samples"])
    assert len(predictions) == 2
