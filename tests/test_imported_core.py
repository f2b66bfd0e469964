"""Bring your own dense model: a pretrained core in timm's naming (safetensors or a weights_only torch file,
local or on S3) starts the dense-based pipelines, with its function kept exactly and its cost declared."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import rmoe
from rmoe import ModelSpec
from rmoe.core_import import import_dense_core
from rmoe.models import TIMM_DENSE_NAMES
from rmoe_platform.cli import pipeline as pipeline_cli
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.pipelines.report import format_report
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.stage.prepare import prepare_stage
from rmoe_platform.stage.worker.model import build_stage_model
from rmoe_platform.tasks import task_for

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# timm's ViT-Ti at the smoke preset's size: 32 px, 4 px patches, 2 blocks of width 64
VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
SWIN_KWARGS = {
    "img_size": 64,
    "window_size": 4,
    "embed_dim": 48,
    "depths": (2, 2, 2, 2),
    "num_heads": (2, 4, 8, 16),
    "drop_path_rate": 0.0,
}


def timm_vit(num_classes: int = 4, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT_KWARGS).eval()


def yaml_kwargs(kwargs: dict) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


def imported_smoke(tmp: Path, checkpoint: str, *overrides: str) -> ExperimentConfig:
    return ExperimentConfig.load(
        SMOKE,
        [
            f"storage={tmp / 'ckpt'}",
            f"results={tmp / 'results'}",
            f"data.uri={tmp / 'data'}",
            "arch=rmoe_vit_tiny_patch16_224",
            f"model_kwargs={yaml_kwargs(VIT_KWARGS)}",
            f"upstream.checkpoint={checkpoint}",
            "pipelines=[dense,rmoe_i,rmoe_d,upcycle]",
            *overrides,
        ],
    )


# ---- the library: formats and naming -------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TIMM_DENSE_NAMES))
def test_timm_names_hold_the_same_state_dict_as_the_dense_rmoe_model(arch: str) -> None:
    with torch.device("meta"):
        ours = rmoe.build_model(ModelSpec(arch)).state_dict()
        theirs = timm.create_model(TIMM_DENSE_NAMES[arch], pretrained=False).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_every_format_imports_the_same_function(tmp_path: Path) -> None:
    dense = timm_vit()
    save_file(dense.state_dict(), tmp_path / "core.safetensors")
    torch.save({"state_dict": dense.state_dict()}, tmp_path / "wrapped.pth")
    torch.save({"model": dense.state_dict(), "epoch": 3}, tmp_path / "model.pt")
    own = rmoe.build_model(ModelSpec("rmoe_vit_tiny_patch16_224", {**VIT_KWARGS, "num_classes": 4}))
    own.load_state_dict(dense.state_dict())
    rmoe.save_model(own, tmp_path / "own.safetensors")
    x = torch.randn(2, 3, 32, 32)
    spec = ModelSpec("rmoe_vit_tiny_patch16_224", VIT_KWARGS)
    formats = {}
    for name in ("core.safetensors", "wrapped.pth", "model.pt", "own.safetensors"):
        core = import_dense_core(tmp_path / name, spec, num_classes=4)
        formats[name] = core.file_format
        assert core.file_classes == 4 and not core.head_reinitialized
        torch.testing.assert_close(core.model.eval()(x), dense(x), rtol=0, atol=0)
    assert formats == {
        "core.safetensors": "safetensors",
        "wrapped.pth": "torch",
        "model.pt": "torch",
        "own.safetensors": "rmoe",
    }


def test_a_head_of_another_class_count_is_reinitialised_by_the_seed(tmp_path: Path) -> None:
    dense = timm_vit(num_classes=1000)
    save_file(dense.state_dict(), tmp_path / "in1k.safetensors")
    spec = ModelSpec("rmoe_vit_tiny_patch16_224", VIT_KWARGS)
    first, again = (import_dense_core(tmp_path / "in1k.safetensors", spec, num_classes=7, seed=3) for _ in range(2))
    assert first.head_reinitialized and first.file_classes == 1000 and first.spec.model_kwargs["num_classes"] == 7
    torch.testing.assert_close(first.model.head.weight, again.model.head.weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(first.model.eval().forward_features(x), dense.forward_features(x), rtol=0, atol=0)


# ---- through the platform --------------------------------------------------------------------------
def test_an_upcycled_stage_model_keeps_the_imported_function(tmp_path: Path) -> None:
    """init_noise 0: the RMoE-I residual and the upcycling stages' models, built by the stage code from
    the imported core, give the timm model's logits (the head is kept: same class count)."""
    dense = timm_vit(num_classes=4)
    torch.save(dense.state_dict(), tmp_path / "core.pth")
    exp = imported_smoke(tmp_path, str(tmp_path / "core.pth"), "moe.init_noise=0.0")
    store = ResultsStore(exp.results)
    runner = ExperimentRunner(exp, store, log=lambda _: None)
    plans = runner.validate()
    assert not (tmp_path / "ckpt").exists(), "validation writes nothing"
    core = runner.run_stages({"upstream_dense"})["upstream_dense"]
    assert core.status == "imported" and core.cost.dollars == 0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = dense(x)
    for pipeline in ("rmoe_i", "upcycle"):
        config = plans[pipeline][1].config
        config = replace(config, model=replace(config.model, parent_checkpoint=core.checkpoint_uri, num_classes=4))
        model, spec = build_stage_model(config, parent=Path(core.checkpoint_uri))
        assert spec.is_moe
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=1e-5)
    (row,) = store.rows(row_type="stage")
    assert row["imported"] and row["status"] == "imported" and row["stage_kind"] == "imported"
    assert row["head_reinitialized"] is False and row["budget_steps"] is None
    assert json.loads(row["config"])["imported"]["format"] == "torch"
    # the platform's own dense checkpoint folder imports as well (here: the one the import just wrote)
    again = imported_smoke(tmp_path / "again", core.checkpoint_uri)
    node = ExperimentRunner(again, ResultsStore(again.results), log=lambda _: None).validate()["dense"][0]
    assert node.imported is not None and (node.imported.file_format, node.imported.file_classes) == ("rmoe", 4)


@pytest.mark.slow
def test_smoke_pipelines_start_from_an_imported_core_on_s3(ray_local, s3_server, tmp_path: Path) -> None:
    bucket, access = s3_server.bucket(), s3_server.access()
    save_file(timm_vit(num_classes=1000).state_dict(), tmp_path / "core.safetensors")
    s3_server.client().upload_file(str(tmp_path / "core.safetensors"), bucket, "cores/vit.safetensors")
    exp = imported_smoke(tmp_path, f"s3://{bucket}/cores/vit.safetensors", "upstream.cost={gpu_days: 1.5}")
    store = ResultsStore(exp.results)
    report = ExperimentRunner(exp, store, log=lambda _: None, s3=access).run()
    assert report.ok, {k: o.error for k, o in report.outcomes.items()}
    rows = store.read().table.to_pylist()
    stages = {r["stage"]: r for r in rows if r["row_type"] == "stage"}
    assert sorted(stages) == sorted(
        [
            "upstream_dense",
            "dense/downstream",
            "rmoe_i/residual",
            "rmoe_i/downstream",
            "rmoe_d/downstream",
            "upcycle/intermediate",
            "upcycle/downstream",
        ]
    )
    core = stages["upstream_dense"]
    assert core["imported"] and core["status"] == "imported" and core["wall_seconds"] is None
    assert core["head_reinitialized"], "1000 ImageNet classes vs the 4 of the upstream data"
    assert core["gpu_days"] == 1.5 and core["dollars"] == pytest.approx(1.5 * 24 * 2.5)
    assert not any(r["stage_kind"] == "upstream_dense" for r in stages.values()), "no upstream stage trained"
    assert stages["dense/downstream"]["head_reinitialized"] is True  # 4 upstream classes vs 3 downstream
    assert stages["rmoe_i/residual"]["head_reinitialized"] is False
    pipelines = {r["pipeline"]: r for r in rows if r["row_type"] == "pipeline"}
    assert set(pipelines) == {"dense", "rmoe_i", "rmoe_d", "upcycle"}
    for name, row in pipelines.items():
        own = [s for key, s in stages.items() if key.startswith(f"{name}/")]
        assert row["imported"]
        assert row["gpu_days"] == 1.5, "CPU stages add no GPU time: the total is the declared cost exactly"
        assert math.isclose(row["dollars"], core["dollars"] + sum(s["dollars"] for s in own), rel_tol=1e-12)
        assert math.isclose(row["device_seconds"], 1.5 * 86400 + sum(s["device_seconds"] for s in own), rel_tol=1e-12)
    table = format_report(report)
    assert "imported" in table and f"s3://{bucket}/cores/vit.safetensors" in table
    # a rerun finds every stage: the import's row is not written twice, its children are cached
    again = ExperimentRunner(exp, store, log=lambda _: None, s3=access).run()
    assert {k: o.status for k, o in again.outcomes.items()} == {
        key: "imported" if key == "upstream_dense" else "cached" for key in stages
    }
    assert len(store.rows(row_type="stage")) == len(stages)


@pytest.mark.slow
def test_segmentation_starts_from_an_imported_swin_core(ray_local, tmp_path: Path) -> None:
    torch.manual_seed(2)
    dense = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, **SWIN_KWARGS).eval()
    save_file(dense.state_dict(), tmp_path / "swin.safetensors")
    exp = ExperimentConfig.load(
        ROOT / "configs" / "seg_demo.yaml",
        [
            "pipelines=[rmoe_d]",
            "arch=rmoe_swin_tiny_patch4_window7_224",
            f"model_kwargs={yaml_kwargs(SWIN_KWARGS)}",
            f"upstream.checkpoint={tmp_path / 'swin.safetensors'}",
            "upstream.data=null",
            "moe.init_noise=0.0",
            f"storage={tmp_path / 'ckpt'}",
            f"results={tmp_path / 'results'}",
            f"data.uri={tmp_path / 'data'}",
            "downstream.data.generate.num_train=64",
            "downstream.data.generate.num_val=16",
            "downstream.budget={steps: 4}",
            "batch_size=16",
            "moe_scaling={num_workers: 1}",
        ],
    )
    store = ResultsStore(exp.results)
    runner = ExperimentRunner(exp, store, log=lambda _: None)
    plans = runner.validate()
    core = runner.run_stages({"upstream_dense"})["upstream_dense"]
    # the features UperNet reads: the upcycled backbone's equal the dense one's, which are timm's
    node = plans["rmoe_d"][-1]
    config = replace(node.config, model=replace(node.config.model, parent_checkpoint=core.checkpoint_uri))
    prepared = prepare_stage(config)
    task = task_for("segmentation", prepared.dataset.card.facts)
    moe_model, spec = task.build(prepared.config, parent=Path(core.checkpoint_uri))
    dense_config = replace(prepared.config, model=replace(prepared.config.model, moe=None))
    dense_model, _ = task.build(dense_config, parent=Path(core.checkpoint_uri))
    assert spec.is_moe and not task.trunk(dense_model).rmoe_spec.is_moe
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(task.trunk(dense_model).eval().forward_features(x), dense.forward_features(x))
        for ours, theirs in zip(moe_model.backbone.eval()(x), dense_model.backbone.eval()(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    report = runner.run()
    assert report.ok, {k: o.error for k, o in report.outcomes.items()}
    (row,) = [r for r in store.rows(row_type="stage") if r["stage"] == "rmoe_d/downstream"]
    assert row["task"] == "segmentation" and row["metric_name"] == "mIoU" and row["metric"] is not None
    assert row["parent_hash"] == report.outcomes["upstream_dense"].node.config_hash
    (pipeline,) = store.rows(row_type="pipeline")
    assert pipeline["imported"] and pipeline["metric"] == row["metric"]


# ---- bad input: exit 2, nothing written ------------------------------------------------------------
def run_job(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The pipeline job's `main` in this process: its exit status and what it printed to stderr. Ray must not
    start. (The job in a process of its own refusing bad input, exit status and all: `test_bad_inputs.py`.)"""
    monkeypatch.setattr(pipeline_cli, "connect", lambda: pytest.fail("Ray was started for a bad core"))
    capsys.readouterr()
    status = pipeline_cli.main(list(args))
    return status, capsys.readouterr().err


def job_args(tmp: Path, checkpoint: str, *overrides: str) -> list[str]:
    sets = [
        f"storage={tmp / 'ckpt'}",
        f"data.uri={tmp / 'data'}",
        f"results={tmp / 'res'}",
        "arch=rmoe_vit_tiny_patch16_224",
        f"model_kwargs={yaml_kwargs(VIT_KWARGS)}",
        f"upstream.checkpoint={checkpoint}",
        "pipelines=[dense,rmoe_d]",
        *overrides,
    ]
    return ["--config", str(SMOKE), *[arg for value in sets for arg in ("--set", value)]]


def write_bad_files(tmp: Path) -> None:
    torch.manual_seed(0)
    other = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4, **SWIN_KWARGS)
    save_file(other.state_dict(), tmp / "swin.safetensors")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp / "pickled.pth")
    save_file(timm_vit().state_dict(), tmp / "good.safetensors")


@pytest.mark.parametrize(
    ("checkpoint", "overrides", "messages"),
    [
        (
            "swin.safetensors",
            [],
            ["swin.safetensors", "mismatched checkpoint", "cls_token: checkpoint - vs model (1, 1, 64)"],
        ),
        ("pickled.pth", [], ["pickled.pth", "weights_only=True", "torch.nn.modules.linear.Linear"]),
        ("missing.safetensors", [], ["no such file", "missing.safetensors"]),
        ("good.safetensors", ["upstream.cost={gpu_days: -1}"], ["experiment.upstream.cost", "gpu_days must be"]),
        ("good.safetensors", ["upstream.data=null", "pipelines=[dense,moe]"], ["moe trains its MoE from scratch"]),
    ],
)
def test_a_bad_core_exits_2_before_anything_is_written(
    tmp_path: Path, checkpoint: str, overrides: list[str], messages: list[str], monkeypatch, capsys
) -> None:
    write_bad_files(tmp_path)
    status, stderr = run_job(monkeypatch, capsys, *job_args(tmp_path, str(tmp_path / checkpoint), *overrides))
    assert status == 2, stderr
    for message in messages:
        assert message in stderr
    assert "Traceback" not in stderr
    assert not any((tmp_path / name).exists() for name in ("ckpt", "res", "data"))


def test_an_unreadable_s3_core_exits_2_before_anything_is_written(
    s3_server, tmp_path: Path, monkeypatch, capsys
) -> None:
    bucket = s3_server.bucket()
    s3_server.client().put_object(Bucket=bucket, Key="cores/broken.safetensors", Body=b"\x00" * 64)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for key, message in (
        ("cores/broken.safetensors", "not a readable safetensors file"),
        ("cores/none.pth", "no such"),
    ):
        uri = f"s3://{bucket}/{key}"
        status, stderr = run_job(monkeypatch, capsys, *job_args(tmp_path, uri))
        assert status == 2, stderr
        assert message in stderr and uri in stderr and "Traceback" not in stderr
        assert not any((tmp_path / name).exists() for name in ("ckpt", "res", "data"))


@pytest.mark.parametrize("preset", ["ade20k_upernet_swin_t", "coco_mask_rcnn_swin_t_1x"])
def test_paper_presets_from_an_imported_swin_core(preset: str) -> None:
    from rmoe_platform.pipelines.accounting import Cost
    from rmoe_platform.pipelines.graph import plan_pipelines
    from rmoe_platform.pipelines.imported import ImportedCore

    trained = ExperimentConfig.load(ROOT / "configs" / "paper" / f"{preset}.yaml")
    exp = ExperimentConfig.load(ROOT / "configs" / "paper" / f"{preset}_imported.yaml")
    assert exp.upstream.imported and exp.upstream.declared_cost.gpu_days == 0
    assert (exp.arch, exp.downstream, exp.intermediate) == (trained.arch, trained.downstream, trained.intermediate)
    spec = ModelSpec(exp.arch, {**exp.model_kwargs, "num_classes": 1000})
    core = ImportedCore(exp.upstream.checkpoint, "0" * 64, "safetensors", 1000, spec, False, Cost(), exp.seed)
    plans = plan_pipelines(exp, core)
    assert set(plans) == {"dense", "rmoe_i", "rmoe_d", "upcycle"}
    assert all(stages[0].kind == "imported" and stages[0].config_hash == core.identity for stages in plans.values())
    trained_plans = plan_pipelines(trained)
    downstream = {p: s[-1].config for p, s in plans.items()}
    assert all(downstream[p].task == trained_plans[p][-1].config.task for p in plans)


def test_a_sweep_refuses_an_imported_core_naming_the_field(tmp_path: Path) -> None:
    from rmoe_platform.config.fields import ConfigError
    from rmoe_platform.sweep.config import SweepConfig

    with pytest.raises(ConfigError, match=r"experiment\.upstream\.checkpoint: sweeps train their own upstream"):
        SweepConfig.load(ROOT / "configs" / "sweeps" / "demo.yaml", [f"experiment.upstream.checkpoint={tmp_path}/x"])
