"""`jobs/pipeline.py --estimate`: each pipeline's projected cost from the config alone (no Ray, no training):
FLOPs = the per-sample FLOPs a run is charged × planned samples; device time from the device table."""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray

from rmoe_platform.cli.pipeline import main
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.cost.devices import DEVICES
from rmoe_platform.cost.estimate import (
    KNOWN_DATASETS,
    ExperimentEstimate,
    estimate,
    measured_utilisation,
    planned_data,
)
from rmoe_platform.cost.tables import format_estimate
from rmoe_platform.names import PIPELINES
from rmoe_platform.pipelines.graph import plan_pipelines
from rmoe_platform.results import ResultsStore
from rmoe_platform.stage.prepare import build_sized_model

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def projections_kept(monkeypatch) -> list[ExperimentEstimate]:
    """Each projection `estimate` makes from now on, in order: the one the CLI printed is checked as is, not
    computed a second time (a paper preset's projection builds and runs a full-size model: seconds each)."""
    from rmoe_platform.cost import estimate as module

    made: list[ExperimentEstimate] = []

    def kept(*args: Any, **kwargs: Any) -> ExperimentEstimate:
        made.append(estimate(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, "estimate", kept)
    return made


@pytest.mark.parametrize("preset", PAPER, ids=lambda p: p.stem)
def test_estimate_prints_every_pipeline_without_ray(preset: Path, monkeypatch) -> None:
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("--estimate must not start or join Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr("rmoe_platform.cli.pipeline.connect", no_ray)
    printed = projections_kept(monkeypatch)
    code, out, err = run_cli("--config", str(preset), "--estimate")
    assert code == 0, err
    exp = ExperimentConfig.load(preset)
    table = out.split("pipeline ", 1)[1]
    for pipeline in exp.pipelines:
        assert any(line.startswith(f"{pipeline} ") for line in table.splitlines()), (pipeline, out)
    [est] = printed
    assert est.device == "h100" and format_estimate(est) in out, "the projection checked below is the one printed"
    sizes = {field: planned_data(spec, field) for field, spec in exp.datasets().items()}
    for key, stage in est.stages.items():
        if stage.mfu_source == "declared":
            assert exp.upstream.imported and key == "upstream_dense"
            continue
        config, data = stage.config, sizes[data_field(key)]
        steps = config.budget.steps or config.budget.epochs * (data.num_train // config.batch_size)
        assert stage.samples == steps * config.batch_size
        assert stage.cost.flops == pytest.approx(stage.flops_per_sample * stage.samples, rel=1e-12)
        spec = DEVICES["h100"]
        assert stage.cost.device_seconds == pytest.approx(stage.cost.flops / (spec.peak("bf16") * spec.mfu))


def data_field(key: str) -> str:
    if key.endswith("/downstream"):
        return "experiment.downstream.data"
    return "experiment.upstream.data"


def test_projected_flops_per_sample_equal_what_a_run_is_charged() -> None:
    """The projection's meta-device models and shared head measurement give the FLOPs `prepare_stage` charges
    a run (built with weights on CPU, as a run's driver does), stage by stage, for the ADE20K preset."""
    exp = ExperimentConfig.load(ROOT / "configs" / "paper" / "ade20k_upernet_swin_t.yaml")
    est = estimate(exp)
    for nodes in plan_pipelines(exp).values():
        for node in nodes:
            if node.key in ("upstream_dense", "dense/downstream", "rmoe_i/residual", "rmoe_d/downstream"):
                data = planned_data(exp.datasets()[f"experiment.{phase_of(node.kind)}.data"], "test")
                config = replace(node.config, model=replace(node.config.model, num_classes=data.num_classes))
                sized, model, task, _ = build_sized_model(config, data.facts, parent=None)
                charged = task.train_flops_per_sample(model, sized)
                assert est.stages[node.key].flops_per_sample == pytest.approx(charged, rel=1e-9), node.key


def phase_of(kind: str) -> str:
    return "downstream" if kind == "downstream" else "upstream"


def test_device_table_overrides_change_gpu_days_as_computed_by_hand() -> None:
    """On the demo's small models: the arithmetic is the device table's, whatever the model (a paper preset's
    projection takes seconds, and this one makes four)."""
    preset = str(ROOT / "configs" / "demo.yaml")
    base = estimate(ExperimentConfig.load(preset), "a100")
    changed = estimate(ExperimentConfig.load(preset, ["devices.a100.mfu=0.5", "devices.a100.peak_bf16=4.0e14"]), "a100")
    for key, stage in changed.stages.items():
        by_hand = stage.cost.flops / (4.0e14 * 0.5) / 86_400
        assert stage.cost.gpu_days == pytest.approx(by_hand, rel=1e-12)
        assert base.stages[key].cost.gpu_days == pytest.approx(stage.cost.flops / (312e12 * 0.40) / 86_400)
        assert stage.cost.dollars == pytest.approx(stage.cost.device_hours * 2.5)  # prices.gpu
    priced = estimate(ExperimentConfig.load(preset, ["devices.a100.dollars_per_hour=1.25"]), "a100")
    total = priced.pipeline_cost("rmoe_i")
    assert total.dollars == pytest.approx(total.device_hours * 1.25)
    # a device of one's own, and a device the table does not have
    own = ExperimentConfig.load(preset, ["devices.mygpu={peak_bf16: 1.0e15, peak_fp32: 5.0e13, mfu: 0.25}"])
    assert estimate(own, "mygpu").pipeline_cost("moe").gpu_days == pytest.approx(
        base.pipeline_cost("moe").flops / (1.0e15 * 0.25) / 86_400
    )
    code, _, err = run_cli("--config", preset, "--estimate", "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err
    code, _, err = run_cli("--config", preset, "--estimate", "--set", "devices.a100.mfu=2")
    assert code == 2 and "devices.a100" in err and "mfu" in err


def test_ratios_to_moe_and_dense_are_printed_from_compute_cost(monkeypatch) -> None:
    preset = str(ROOT / "configs" / "paper" / "ade20k_upernet_swin_t.yaml")
    printed = projections_kept(monkeypatch)
    code, out, _ = run_cli("--config", preset, "--estimate", "--device", "l4")
    assert code == 0
    [est] = printed
    assert est.device == "l4"
    row = next(line for line in out.splitlines() if line.startswith("rmoe_i "))
    moe, rmoe_i = est.pipeline_cost("moe"), est.pipeline_cost("rmoe_i")
    assert row.split()[-2] == f"{rmoe_i.device_seconds / moe.device_seconds:.3f}"
    assert row.split()[-1] == f"{rmoe_i.device_seconds / est.pipeline_cost('dense').device_seconds:.3f}"


def test_calibration_replaces_the_assumed_utilisation(tmp_path: Path, monkeypatch) -> None:
    """Stage rows that measured a utilisation on a device replace the assumed one: per stage where the store
    has that stage, FLOP-weighted over all measured stages elsewhere."""
    store = ResultsStore(str(tmp_path / "results"))
    rows = [
        {
            "row_type": "stage",
            "run_id": "a",
            "stage": "upstream_dense",
            "device_model": "h100",
            "mfu": 0.5,
            "flops": 3e18,
        },
        {
            "row_type": "stage",
            "run_id": "b",
            "stage": "upstream_moe",
            "device_model": "h100",
            "mfu": 0.25,
            "flops": 1e18,
        },
        {
            "row_type": "stage",
            "run_id": "c",
            "stage": "upstream_dense",
            "device_model": "cpu",
            "mfu": 0.9,
            "flops": 1e9,
        },
    ]
    store.append(rows)
    measured = measured_utilisation(store.read().table.to_pylist(), "h100")
    assert measured["upstream_dense"] == 0.5 and measured["upstream_moe"] == 0.25
    assert measured["*"] == pytest.approx(4e18 / (3e18 / 0.5 + 1e18 / 0.25))
    preset = str(ROOT / "configs" / "paper" / "ade20k_upernet_swin_t.yaml")
    printed = projections_kept(monkeypatch)
    code, out, err = run_cli("--config", preset, "--estimate", "--calibrate-from", str(tmp_path / "results"))
    assert code == 0, err
    assert "0.50*" in out and "measured on an earlier run" in out
    [est] = printed  # the CLI's projection, on the preset's default device
    assert est.device == "h100"
    assert est.stages["upstream_dense"].mfu == 0.5 and est.stages["upstream_dense"].mfu_source == "measured"
    assert est.stages["upstream_moe"].mfu == 0.25
    assert est.stages["dense/downstream"].mfu == pytest.approx(measured["*"])
    code, _, err = run_cli(
        "--config", preset, "--estimate", "--device", "l4", "--calibrate-from", str(tmp_path / "results")
    )
    assert code == 2 and "no stage" in err and "'l4'" in err


def test_an_epoch_budget_on_an_unknown_dataset_is_refused_naming_the_field() -> None:
    preset = str(ROOT / "configs" / "paper" / "ade20k_upernet_swin_t.yaml")
    code, _, err = run_cli("--config", preset, "--estimate", "--set", "upstream.data.uri=my-own-set")
    assert code == 2 and "experiment.upstream.data.uri" in err and "my-own-set" in err
    assert all(name in err for name in KNOWN_DATASETS), "the error names the datasets an epoch budget can use"


def test_the_demo_projects_on_cpu_by_default() -> None:
    code, out, err = run_cli("--config", str(ROOT / "configs" / "demo.yaml"), "--estimate")
    assert code == 0, err
    assert "on cpu" in out and all(any(ln.startswith(f"{p} ") for ln in out.splitlines()) for p in PIPELINES)
    cost = estimate(ExperimentConfig.load(ROOT / "configs" / "demo.yaml")).pipeline_cost("rmoe_i")
    assert cost.gpu_days == 0 and math.isclose(cost.dollars, cost.device_hours * 0.05)  # prices.cpu
    code, out, err = run_cli("--config", str(ROOT / "configs" / "demo.yaml"), "--estimate", "--seeds", "0,1,2")
    assert code == 0 and "seeds 0, 1, 2: every pipeline runs once per seed, 3x these costs" in out, err
