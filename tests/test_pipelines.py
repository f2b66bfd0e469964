"""Pipelines as stage graphs, the stage cache, cost accounting, and the main job's command line (a job on S3
data, checkpoints and results: tests/test_job_submit.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.pipelines.accounting import Cost, stage_cost, total
from rmoe_platform.pipelines.graph import plan_pipelines, shared_keys
from rmoe_platform.pipelines.report import format_report
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base = [f"storage={tmp_path / 'ckpt'}", f"results={tmp_path / 'results'}", f"data.uri={tmp_path / 'data'}"]
    return ExperimentConfig.load(SMOKE, [*base, *overrides])


# ---- the graph -----------------------------------------------------------------------------------
def test_pipelines_share_the_dense_upstream_node(tmp_path: Path) -> None:
    plans = plan_pipelines(smoke(tmp_path))
    assert set(plans) == {"dense", "moe", "rmoe_i", "rmoe_d", "upcycle"}
    assert [s.key for s in plans["rmoe_i"]] == ["upstream_dense", "rmoe_i/residual", "rmoe_i/downstream"]
    assert [s.key for s in plans["moe"]] == ["upstream_moe", "moe/downstream"]
    dense_nodes = {id(stages[0]) for name, stages in plans.items() if name != "moe"}
    assert len(dense_nodes) == 1
    assert shared_keys(plans) == {"upstream_dense"}
    residual = plans["rmoe_i"][1].config
    assert residual.trainable == ("residual", "router") and residual.model.moe.freeze_core
    assert residual.data == plans["dense"][0].config.data  # the intermediate stage trains on upstream data
    assert plans["upcycle"][1].config.model.moe.residual is False


def test_hashes_change_only_downstream_of_a_change(tmp_path: Path) -> None:
    before = {s.key: s.config_hash for stages in plan_pipelines(smoke(tmp_path)).values() for s in stages}
    after = {
        s.key: s.config_hash
        for stages in plan_pipelines(smoke(tmp_path, "intermediate.budget.steps=5")).values()
        for s in stages
    }
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"rmoe_i/residual", "rmoe_i/downstream", "upcycle/intermediate", "upcycle/downstream"}
    elsewhere = smoke(tmp_path / "elsewhere", f"data.uri={tmp_path / 'data'}")
    moved = {s.key: s.config_hash for stages in plan_pipelines(elsewhere).values() for s in stages}
    assert moved == before, "where checkpoints are written is not part of a stage's identity"


# ---- stage identity across refactors -------------------------------------------------------------
# Recorded at a6b11da, before `rmoe_platform` was regrouped into subpackages (issue 15): cached stages in
# existing results stores are found by these hashes, so a change here silently retrains everything.
STAGE_HASHES_BEFORE_THE_MOVE = {
    "demo": {
        "dense/downstream": "2761789ed6610279",
        "moe/downstream": "86ce62001cd18f40",
        "rmoe_d/downstream": "f333f9b4af068db6",
        "rmoe_i/downstream": "839db866af7075be",
        "rmoe_i/residual": "49c0f951caf35237",
        "upcycle/downstream": "0041609569357616",
        "upcycle/intermediate": "bcb16331251cd677",
        "upstream_dense": "61fefb0b8ab02d4a",
        "upstream_moe": "6719b4231578ae78",
    },
    "seg_demo": {
        "dense/downstream": "fb139e2ad5b56301",
        "moe/downstream": "934443e73e6c69af",
        "rmoe_d/downstream": "a74ad8e54b29a14d",
        "rmoe_i/downstream": "e9bd3487e3058c3e",
        "rmoe_i/residual": "7a399913dd1565ba",
        "upcycle/downstream": "3559f2f1ee06ceca",
        "upcycle/intermediate": "8a1ee4b2a2b5b458",
        "upstream_dense": "86fd65a1d2a5e2cf",
        "upstream_moe": "e4046c8c4b6d7300",
    },
    "smoke": {
        "dense/downstream": "b754598c18b7e1cd",
        "moe/downstream": "6554606408846efa",
        "rmoe_d/downstream": "4604f5b43cd8ab09",
        "rmoe_i/downstream": "dc3b44cb292d9fb3",
        "rmoe_i/residual": "d150f8453f0e8ab2",
        "upcycle/downstream": "86e101496f64205d",
        "upcycle/intermediate": "de24da0eac9bd84e",
        "upstream_dense": "2fa87f65d1f8ca63",
        "upstream_moe": "c71af0ff612f5c5b",
    },
}


# Presets changed since the hashes were recorded, kept as they were then (the demo got its issue-20 setting).
FORMER_PRESETS = {"demo": ROOT / "tests" / "presets" / "demo_before_issue20.yaml"}


@pytest.mark.parametrize("preset", sorted(STAGE_HASHES_BEFORE_THE_MOVE))
def test_stage_hashes_of_the_presets_are_unchanged(preset: str) -> None:
    exp = ExperimentConfig.load(FORMER_PRESETS.get(preset, ROOT / "configs" / f"{preset}.yaml"))
    hashes = {node.key: node.config_hash for stages in plan_pipelines(exp).values() for node in stages}
    assert hashes == STAGE_HASHES_BEFORE_THE_MOVE[preset]


# ---- accounting ----------------------------------------------------------------------------------
def test_stage_cost_prices_device_time() -> None:
    gpu = stage_cost(1e15, 7200.0, "gpu", {"gpu": 2.5, "cpu": 0.1})
    assert gpu.dollars == pytest.approx(5.0) and gpu.gpu_days == pytest.approx(7200 / 86400)
    cpu = stage_cost(1e12, 3600.0, "cpu", {"gpu": 2.5, "cpu": 0.1})
    assert cpu.dollars == pytest.approx(0.1) and cpu.gpu_days == 0
    assert total([gpu, cpu]).flops == pytest.approx(1e15 + 1e12)
    assert (gpu - cpu).device_seconds == pytest.approx(3600.0)
    with pytest.raises(ValueError, match="prices"):
        stage_cost(1.0, 1.0, "tpu", {"gpu": 1.0})
    assert Cost().dollars == 0


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(ray_local, tmp_path_factory) -> tuple[Path, Any]:
    tmp = tmp_path_factory.mktemp("smoke")
    exp = smoke(tmp)
    report = ExperimentRunner(exp, ResultsStore(exp.results), log=lambda _: None).run()
    return tmp, report


@pytest.mark.slow
def test_smoke_preset_runs_all_pipelines_end_to_end(smoke_run) -> None:
    tmp, report = smoke_run
    assert report.ok, format_report(report)
    table = ResultsStore(str(tmp / "results")).read().table.to_pylist()
    stages = [row for row in table if row["row_type"] == "stage"]
    pipelines = [row for row in table if row["row_type"] == "pipeline"]
    assert sorted(row["stage"] for row in stages) == sorted(
        [
            "upstream_dense",
            "dense/downstream",
            "upstream_moe",
            "moe/downstream",
            "rmoe_i/residual",
            "rmoe_i/downstream",
            "rmoe_d/downstream",
            "upcycle/intermediate",
            "upcycle/downstream",
        ]
    )  # one row per stage run: the shared dense upstream ran exactly once
    dense_upstream = next(row for row in stages if row["stage"] == "upstream_dense")
    assert dense_upstream["shared"] and set(dense_upstream["pipeline"].split(",")) == {
        "dense",
        "rmoe_i",
        "rmoe_d",
        "upcycle",
    }
    assert sorted(row["pipeline"] for row in pipelines) == ["dense", "moe", "rmoe_d", "rmoe_i", "upcycle"]
    by_name = {row["pipeline"]: row for row in pipelines}
    # a shared stage is charged in full to every pipeline that uses it
    stage_flops = {row["stage"]: row["flops"] for row in stages}
    assert by_name["rmoe_i"]["flops"] == pytest.approx(
        stage_flops["upstream_dense"] + stage_flops["rmoe_i/residual"] + stage_flops["rmoe_i/downstream"]
    )
    assert by_name["rmoe_i"]["marginal_flops"] == pytest.approx(by_name["rmoe_i"]["flops"] - by_name["dense"]["flops"])
    assert all(row["status"] == "succeeded" and row["checkpoint_uri"] for row in stages)
    assert all(0 <= row["metric"] <= 1 for row in pipelines)
    for row in stages:  # the cost ledger: compared cost is compute only, overhead beside it
        ledger = json.loads(row["ledger"])
        assert sum(ledger.values()) == pytest.approx(row["wall_seconds"], rel=1e-3)
        compute = ledger["train_seconds"] + ledger["eval_seconds"]
        rounding = 2e-4 * row["num_workers"]  # the row's ledger keeps each part to 1e-4 s
        assert row["device_seconds"] == pytest.approx(compute * row["num_workers"], rel=1e-3, abs=rounding)
        assert row["overhead_device_seconds"] == pytest.approx(
            (row["wall_seconds"] - compute) * row["num_workers"], rel=1e-3, abs=rounding
        )
        assert row["overhead_device_seconds"] > 0 and row["device_model"] == "cpu" and row["mfu"] > 0
    assert by_name["rmoe_i"]["overhead_device_seconds"] == pytest.approx(
        sum(
            s["overhead_device_seconds"]
            for s in stages
            if s["stage"] in ("upstream_dense", "rmoe_i/residual", "rmoe_i/downstream")
        )
    )
    text = format_report(report)
    assert "Δ vs dense" in text and "rmoe_i" in text and "overhead-s" in text
    # two fits: each core and every stage built on it train on one worker group, Ray Train started once
    by_stage = {row["stage"]: row for row in stages}
    roots = {"upstream_dense", "upstream_moe"}
    for row in stages:
        root = "upstream_moe" if row["stage"].startswith(("upstream_moe", "moe/")) else "upstream_dense"
        folder = Path(by_stage[root]["checkpoint_uri"]).parent
        assert folder.name == by_stage[root]["run_id"] and Path(row["checkpoint_uri"]).parent == folder, row["stage"]
        assert (json.loads(row["ledger"])["start_seconds"] > 0) == (row["stage"] in roots), row["stage"]


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_a_budget_change_reruns_only_its_descendants(smoke_run) -> None:
    tmp, _ = smoke_run
    store = ResultsStore(str(tmp / "results"))
    stage_rows = len(store.rows(row_type="stage"))
    again = ExperimentRunner(smoke(tmp), store, log=lambda _: None).run()
    assert {o.status for o in again.outcomes.values()} == {"cached"}
    assert len(store.rows(row_type="stage")) == stage_rows, "a cache hit is not a new stage run"

    changed = smoke(tmp, "intermediate.budget.steps=3", "pipelines=[dense,rmoe_i]")
    report = ExperimentRunner(changed, store, log=lambda _: None).run()
    status = {key: o.status for key, o in report.outcomes.items()}
    assert status == {
        "upstream_dense": "cached",
        "dense/downstream": "cached",
        "rmoe_i/residual": "succeeded",
        "rmoe_i/downstream": "succeeded",
    }


# ---- the command line ----------------------------------------------------------------------------
def run_job(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_describes_the_job() -> None:
    out = run_job("--help")
    assert out.returncode == 0 and "--pipelines" in out.stdout and "--results" in out.stdout
